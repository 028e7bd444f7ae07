"""The Definitions pages over httpx against the real app: the list and its filters, a
definition's versions, diff, graph and runs, the Run form made from its input schema, the
workflow-token forms (run, deploy, arm, rollback, status) with their CSRF checks, what
read-only tokens see, escaping, and the links between a run and its definition."""

from __future__ import annotations

import pytest

from daemon.web import runform

SCHEMA = {
    "type": "object",
    "required": ["who"],
    "properties": {
        "who": {"type": "string", "title": "Customer"},
        "n": {"type": "integer", "default": 3},
        "x": {"type": "number"},
        "ok": {"type": "boolean", "default": False},
        "tier": {"enum": ["gold", "silver", 3, None]},
        "tags": {"type": "array"},
        "any": {},
    },
}


# -- the Run form, from a schema and back --------------------------------------------------


def test_a_schema_makes_one_field_per_property():
    fields = runform.fields(SCHEMA)
    assert fields is not None
    kinds = {f.name: f.kind for f in fields}
    assert kinds == {"who": "string", "n": "integer", "x": "number", "ok": "boolean",
                     "tier": "enum", "tags": "json", "any": "json"}  # fmt: skip
    by_name = {f.name: f for f in fields}
    assert by_name["who"].required and by_name["who"].title == "Customer"
    assert not by_name["n"].required and by_name["n"].default == "3"
    assert by_name["ok"].default == "false"
    assert [v for v, _ in by_name["tier"].options] == ['"gold"', '"silver"', "3", "null"]
    assert by_name["who"].form_name == "in.who"


@pytest.mark.parametrize("schema", [None, {}, {"type": "object"}, {"type": "array"},
                                    {"type": "string", "properties": {"a": {}}}, "x",
                                    {"properties": {f"p{i}": {} for i in range(61)}}])  # fmt: skip
def test_without_properties_the_input_is_one_json_box(schema):
    assert runform.fields(schema) is None
    assert runform.read(schema, {"input": ' {"a": [1, 2]} '}) == ({"a": [1, 2]}, [])
    assert runform.read(schema, {"input": ""}) == ({}, [])
    data, problems = runform.read(schema, {"input": "{nope"})
    assert data is None and problems[0].startswith("the input is not valid JSON")


def test_the_form_reads_back_typed_values_and_leaves_empty_fields_out():
    form = {"in.who": " Ada ", "in.n": "5", "in.x": "2.50", "in.ok": "true",
            "in.tier": "3", "in.tags": '["a"]', "in.any": ""}  # fmt: skip
    data, problems = runform.read(SCHEMA, form)
    assert problems == []
    assert data == {"who": " Ada ", "n": 5, "x": 2.5, "ok": True, "tier": 3, "tags": ["a"]}
    assert runform.read(SCHEMA, {"in.x": "7", "in.tier": "null"})[0] == {"x": 7, "tier": None}
    assert runform.read(SCHEMA, {"in.who": "", "in.n": " "}) == ({}, [])  # the schema check says
    assert runform.read(SCHEMA, {"in.who": " "}) == ({"who": " "}, [])  # what is missing


def test_values_that_do_not_fit_their_field_are_all_reported():
    form = {"in.n": "2.5", "in.x": "NaN", "in.ok": "yes", "in.tier": '"bronze"',
            "in.tags": "[1,", "in.who": "ok"}  # fmt: skip
    data, problems = runform.read(SCHEMA, form)
    assert sorted(p.split(":")[0] for p in problems) == ["n", "ok", "tags", "tier", "x"]
