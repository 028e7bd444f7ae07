"""The Run form of a definition's page: fields made from its `input_schema`, and the run's
input read back from the posted form.

A property of type string, number, integer or boolean, or one with an `enum`, is one input;
anything else (object, array, several types, no type) is a JSON textarea. A schema that is
not an object with properties, or none at all, gives a single JSON textarea for the whole
input. The server checks the input against the schema when the run starts (422 with every
problem); this module only turns text into JSON values, and says which fields it could not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

PREFIX = "in."  # form field names of the input's properties: "in.<property>"
WHOLE = "input"  # the single JSON textarea's field
MAX_PROPERTIES = 60  # more than this: one JSON textarea (a form has a field limit)
MAX_OPTIONS = 200  # an enum with more choices is a text field


@dataclass(frozen=True)
class Field:
    name: str  # the property
    kind: str  # string | number | integer | boolean | enum | json
    required: bool
    title: str
    description: str
    options: tuple[tuple[str, str], ...] = ()  # enum: (posted value = JSON text, label)
    default: str = ""  # the text the field starts with

    @property
    def form_name(self) -> str:
        return PREFIX + self.name


def _object(schema: Any) -> dict[str, Any] | None:
    if isinstance(schema, orjson.Fragment):
        schema = orjson.loads(orjson.dumps(schema))
    return schema if isinstance(schema, dict) else None


def fields(schema: Any) -> list[Field] | None:
    """The form's fields, or None when the input is one JSON textarea."""
    schema = _object(schema)
    props = schema.get("properties") if schema is not None else None
    if not isinstance(props, dict) or not props or len(props) > MAX_PROPERTIES:
        return None
    if schema is not None and schema.get("type", "object") != "object":
        return None
    required = schema.get("required") if schema is not None else None
    needed = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    return [_field(str(name), spec, name in needed) for name, spec in props.items()]


def _field(name: str, spec: Any, required: bool) -> Field:
    spec = spec if isinstance(spec, dict) else {}
    kind = spec.get("type")
    title = str(spec.get("title") or name)
    description = str(spec.get("description") or "")
    default = spec.get("default")
    enum = spec.get("enum")
    if isinstance(enum, list) and 0 < len(enum) <= MAX_OPTIONS:
        options = tuple((orjson.dumps(v).decode(), _label(v)) for v in enum)
        chosen = orjson.dumps(default).decode() if "default" in spec else ""
        return Field(name, "enum", required, title, description, options, chosen)
    if kind in ("string", "number", "integer", "boolean"):
        text = "" if default is None else _label(default) if kind != "boolean" else ""
        if kind == "boolean" and isinstance(default, bool):
            text = "true" if default else "false"
        return Field(name, kind, required, title, description, default=text)
    text = orjson.dumps(default, option=orjson.OPT_INDENT_2).decode() if "default" in spec else ""
    return Field(name, "json", required, title, description, default=text)


def _label(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def read(schema: Any, form: dict[str, str]) -> tuple[Any, list[str]]:
    """(the run's input, the problems found reading the form): a field left empty is left
    out; the server's schema check reports what is missing."""
    made = fields(schema)
    if made is None:
        raw = form.get(WHOLE, "").strip()
        if not raw:
            return {}, []
        try:
            return orjson.loads(raw), []
        except orjson.JSONDecodeError as exc:
            return None, [f"the input is not valid JSON ({exc})"]
    data: dict[str, Any] = {}
    problems: list[str] = []
    for field in made:
        raw = form.get(field.form_name, "")
        if not raw.strip() and (field.kind != "string" or raw == ""):
            continue  # left empty: not given (a blank string is given as typed)
        try:
            data[field.name] = _value(field, raw)
        except ValueError as exc:
            problems.append(f"{field.name}: {exc}")
    return data, problems


def _value(field: Field, raw: str) -> Any:
    text = raw.strip()
    if field.kind == "string":
        return raw
    if field.kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
    if field.kind == "number":
        try:
            number = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        return (
            int(number)
            if number.is_integer() and "." not in text and "e" not in text.lower()
            else number
        )
    if field.kind == "boolean":
        if text not in ("true", "false"):
            raise ValueError("choose true or false")
        return text == "true"
    if field.kind == "enum":
        allowed = [value for value, _ in field.options]
        if text not in allowed:
            raise ValueError("not one of the choices")
        return orjson.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
