"""Placeholders, branch conditions and the sandbox."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.placeholders import TemplateError
from daemon.sandbox import MAX_SIZE, evaluate, render_value, truthy
from daemon.templating import check_expression

SCOPE: dict[str, Any] = {
    "input": {
        "title": "New Policy",
        "tags": ["a", "b"],
        "meta": {"k": 1, "nested": {"deep": True}},
        "n": 42,
        "ratio": 0.5,
        "flag": True,
        "off": False,
        "nothing": None,
        "empty": "",
        "items": ["kept", "as", "a", "key"],
        "keys": "a key named keys",
        "values": {"v": 1},
        "get": 7,
    },
    "steps": {
        "search": {"result": [{"id": 1}, {"id": 2}], "status": "done", "attempt": 1},
    },
    "result": {"score": 0.9, "roles": ["user", "admin"], "ok": True},
    "workflow": {"id": 1773850841512, "name": "wf", "created_by": "james"},
}


def render(value: Any, scope: dict[str, Any] | None = None) -> Any:
    return render_value(value, SCOPE if scope is None else scope)


def same(a: Any, b: Any) -> bool:
    """Equal with JSON types: 1 != 1.0 != true."""
    return orjson.dumps(a) == orjson.dumps(b)


# -- whole placeholders keep their JSON type ---------------------------------------------


@pytest.mark.parametrize("open_, close", [("<<", ">>"), ("{{", "}}")])
@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("input.tags", ["a", "b"]),
        ("input.meta", {"k": 1, "nested": {"deep": True}}),
        ("input.n", 42),
        ("input.ratio", 0.5),
        ("input.flag", True),
        ("input.off", False),
        ("input.nothing", None),
        ("input.empty", ""),
        ("input.title", "New Policy"),
        ("steps.search.result", [{"id": 1}, {"id": 2}]),
        ("steps.search.result[1].id", 2),
        ("result.roles", ["user", "admin"]),
        ("workflow.id", 1773850841512),
        ("input.n + 1", 43),
        ("input.tags | length", 2),
        ("[input.n, input.flag]", [42, True]),
        ("input.tags + ['c']", ["a", "b", "c"]),
    ],
)
def test_whole_placeholder_keeps_json_type(
    open_: str, close: str, expr: str, expected: Any
) -> None:
    assert same(render(f"{open_}{expr}{close}"), expected)
    assert same(render(f"{open_} {expr} {close}"), expected)


def test_tuple_results_become_lists() -> None:
    assert render("<<(1, 2)>>") == [1, 2]


# -- interpolation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Title: <<input.title>>", "Title: New Policy"),
        ("Title: {{input.title}}!", "Title: New Policy!"),
        ("n=<<input.n>>", "n=42"),
        ("r=<<input.ratio>>", "r=0.5"),
        ("tags=<<input.tags>>", 'tags=["a","b"]'),
        ("meta={{ input.meta }}", 'meta={"k":1,"nested":{"deep":true}}'),
        ("f=<<input.flag>> n=<<input.nothing>>", "f=true n=null"),
        ("<<input.title>> / {{input.n}}", "New Policy / 42"),
        ("<<input.n>><<input.n>>", "4242"),
        ("{{input.n}}{{input.title}}", "42New Policy"),
        ("[<<input.empty>>]", "[]"),
    ],
)
def test_interpolation_in_longer_strings(text: str, expected: str) -> None:
    assert render(text) == expected


def test_nested_args_render_recursively() -> None:
    args = {
        "query": "<<input.title>>",
        "list": ["<<input.n>>", "x <<input.n>>", 3, None, ["{{input.tags}}"]],
        "obj": {"deep": {"flag": "<<input.flag>>", "plain": "no placeholders"}},
        "number": 1.5,
        "bool": False,
        "null": None,
    }
    assert render(args) == {
        "query": "New Policy",
        "list": [42, "x 42", 3, None, [["a", "b"]]],
        "obj": {"deep": {"flag": True, "plain": "no placeholders"}},
        "number": 1.5,
        "bool": False,
        "null": None,
    }


@pytest.mark.parametrize(
    "text",
    ["", "plain", "a < b > c", "<< not closed", "{{ not closed", "}} >>", "<>", "{ {x} }", "<<>>"],
)
def test_strings_without_placeholders_are_unchanged(text: str) -> None:
    assert render(text) == text


def test_render_does_not_re_render_values() -> None:
    scope = {"input": {"evil": "<<input.secret>>", "secret": "s"}}
    assert render_value("<<input.evil>>", scope) == "<<input.secret>>"
    assert render_value("x <<input.evil>>", scope) == "x <<input.secret>>"


def test_render_does_not_modify_args() -> None:
    args = {"a": ["<<input.n>>"]}
    render(args)
    assert args == {"a": ["<<input.n>>"]}


def test_interpolating_a_big_integer_is_a_template_error() -> None:
    # orjson cannot encode integers beyond 64 bits; that must surface as a
    # TemplateError (the executor only catches TemplateError while rendering args).
    with pytest.raises(TemplateError):
        render("id-<<2 ** 70>>")


# -- undefined names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("input.missing", ("missing",)),
        ("nope", ("nope",)),
        ("steps.unknown.result", ("unknown",)),
        ("steps.search.missing_field", ("missing_field",)),
        ("input.meta.nested.gone", ("gone",)),
        ("error.message", ("error",)),
        ("input.missing | length", ("missing",)),
    ],
)
@pytest.mark.parametrize("template", ["<<{}>>", "{{{{{}}}}}", "prefix <<{}>> suffix"])
def test_undefined_names_raise_naming_the_variable(
    expr: str, names: tuple[str, ...], template: str
) -> None:
    with pytest.raises(TemplateError) as exc:
        render(template.format(expr))
    for name in names:
        assert name in str(exc.value)
    assert expr in str(exc.value)


@pytest.mark.parametrize("expr", ["input.missing", "nope", "steps.unknown.result"])
def test_undefined_in_conditions_raise(expr: str) -> None:
    with pytest.raises(TemplateError):
        truthy(expr, SCOPE)
    with pytest.raises(TemplateError):
        truthy(f"{expr} == 1", SCOPE)


def test_undefined_in_a_nested_arg_raises() -> None:
    with pytest.raises(TemplateError, match="missing"):
        render({"a": [{"b": "x <<input.missing>>"}]})


# -- dict keys before dict methods --------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("input.items", ["kept", "as", "a", "key"]),
        ("input.keys", "a key named keys"),
        ("input.values", {"v": 1}),
        ("input.get", 7),
        ("input['items']", ["kept", "as", "a", "key"]),
    ],
)
def test_dict_keys_win_over_dict_methods(expr: str, expected: Any) -> None:
    assert evaluate(expr, SCOPE) == expected
    assert render(f"<<{expr}>>") == expected


@pytest.mark.parametrize("expr", ["result.items", "result.keys", "result.update", "result.pop"])
def test_missing_key_named_like_a_method_is_undefined(expr: str) -> None:
    with pytest.raises(TemplateError):
        render(f"<<{expr}>>")


# -- branch conditions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "result", "expected"),
    [
        ("result == true", True, True),
        ("result == true", False, False),
        ("result == true", "true", False),
        ("result == false", False, True),
        ("result.score > 0.8", {"score": 0.9}, True),
        ("result.score > 0.8", {"score": 0.8}, False),
        ('"admin" in result.roles', {"roles": ["user", "admin"]}, True),
        ('"admin" in result.roles', {"roles": ["user"]}, False),
        ("not result", None, True),
        ("not result", [], True),
        ("not result", {"a": 1}, False),
        ("result", 0, False),
        ("result and result.ok", {"ok": True}, True),
        ("result.count >= 3 or result.force", {"count": 1, "force": True}, True),
        ("result | length > 1", [1, 2], True),
    ],
)
def test_branch_conditions(expr: str, result: Any, expected: bool) -> None:
    assert check_expression(expr) is None
    assert truthy(expr, {**SCOPE, "result": result}) is expected


@pytest.mark.parametrize("expr", ["result.score > 'high'", "result + 1", "result.score.x.y"])
def test_condition_errors_are_template_errors(expr: str) -> None:
    with pytest.raises(TemplateError):
        truthy(expr, {"result": {"score": 1}})


# -- sandbox -------------------------------------------------------------------------------

ESCAPES = [
    "''.__class__.__mro__",
    "cycler.__init__.__globals__",
    "joiner",
    "lipsum",
    "namespace",
    "range(10**9)",
    "''.__class__.__base__.__subclasses__()",
    "input.__class__",
    "result.__init__",
    '"a" * 10**9',
    "2 ** (10**8)",
    "[1] * 10**9",
    "self",
    "config",
    "request",
    "().__class__",
    "'{0.__class__}'.format(1)",
    "'{0.__class__.__mro__}'.format(input)",
    "input|attr('__class__')",
    "input['__class__']",
    "result['__init__']",
    "dict",
    "url_for",
    "g",
    "session",
    "loop",
    "super()",
    "caller",
    "input.tags.append(1)",
    "input.meta.update({'k': 2})",
    "10**9 * 'a'",
    "'ab' * 600000",
    "'a' * 1000 * 1000 * 1000",
    "(1,) * 10**9",
]


@pytest.mark.parametrize("expr", ESCAPES)
def test_sandbox_escapes_fail_cleanly(expr: str) -> None:
    for run in (
        lambda: evaluate(expr, SCOPE),
        lambda: truthy(expr, SCOPE),
        lambda: render(f"<<{expr}>>"),
        lambda: render(f"x {{{{{expr}}}}} y"),
    ):
        with pytest.raises(TemplateError):
            run()
    assert SCOPE["input"]["tags"] == ["a", "b"] and SCOPE["input"]["meta"]["k"] == 1


def test_power_is_left_associative_and_harmless() -> None:
    # Jinja parses `a ** b ** c` as `(a ** b) ** c`: `2 ** 10**8` is 1024**8 = 2**80,
    # a small number, not 2**(10**8).
    assert evaluate("2 ** 10**8", SCOPE) == 2**80


# Expressions whose result is far beyond MAX_SIZE / MAX_POWER by routes other than
# a single `*` or `**` (kept at 10x the limit so the tests stay fast while they fail).
RESOURCE_BYPASSES = [
    "'x'.ljust(10**7)",
    "'x'.zfill(10**7)",
    "'x'.center(10**7)",
    "'{:>10000000}'.format(1)",
    "'%10000000d' % 1",
    "([1] * 100000) | join('x' * 100)",
    "'abc'.replace('', 'x' * 999999)",
    "(2 ** 10000) ** 1000",
]


@pytest.mark.parametrize("expr", RESOURCE_BYPASSES)
def test_sandbox_bounds_results_built_by_other_routes(expr: str) -> None:
    with pytest.raises(TemplateError):
        value = evaluate(expr, SCOPE)
        pytest.fail(f"built a {type(value).__name__} of size {_size(value)}")


def _size(value: Any) -> int:
    return value.bit_length() // 8 if isinstance(value, int) else len(value)


def test_check_expression_does_not_build_huge_constants() -> None:
    # Jinja folds constant `%` expressions at compile time, so validating a flow would
    # build the 10 MB string (and keep it in the compile cache).
    tracemalloc.start()
    try:
        check_expression("'%10000001d' % 2")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_SIZE


@pytest.mark.parametrize(
    "expr",
    [
        "''.__class__.__mro__",
        "cycler.__init__.__globals__",
        "''.__class__.__base__.__subclasses__()",
        "input.__class__",
        "result.__init__",
        "().__class__",
        "input['__class__']",
        "steps.a._private",
        "input|attr('__class__')",
    ],
)
def test_check_expression_rejects_detectable_escapes(expr: str) -> None:
    problem = check_expression(expr)
    assert problem is not None
    assert expr in problem


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [("input.a +", "syntax"), ("result ==", "syntax"), ("(", "syntax"), ("", "empty")],
)
def test_check_expression_reports_syntax_errors(expr: str, fragment: str) -> None:
    problem = check_expression(expr)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize(
    "expr",
    [
        "input.title",
        "steps.search.result[0].id",
        "result.score > 0.8",
        '"admin" in result.roles',
        "input.items",
        "input.tags | join(', ')",
        "not result",
    ],
)
def test_check_expression_accepts_ordinary_expressions(expr: str) -> None:
    assert check_expression(expr) is None


# -- properties ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
identifiers = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,12}", fullmatch=True)


@settings(max_examples=150)
@given(data=st.dictionaries(identifiers, json_values, min_size=1, max_size=6), pick=st.data())
def test_whole_placeholder_returns_the_input_value(data: dict[str, Any], pick: Any) -> None:
    key = pick.draw(st.sampled_from(sorted(data)))
    scope = {"input": data}
    for text in (f"<<input.{key}>>", f"{{{{ input.{key} }}}}", f"<<input['{key}']>>"):
        assert same(render_value(text, scope), data[key])


no_placeholders = st.text().filter(lambda s: "<<" not in s and "{{" not in s)


@settings(max_examples=150)
@given(text=no_placeholders)
def test_strings_without_placeholders_are_identity(text: str) -> None:
    assert render_value(text, {}) == text


@settings(max_examples=100)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | no_placeholders,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=15,
    )
)
def test_values_without_placeholders_are_identity(value: Any) -> None:
    assert render_value(value, {}) == value
