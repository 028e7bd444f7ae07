"""A definition's input_schema, used without side effects.

jsonschema resolves a `$ref` it has no document for by fetching it with urllib (a
deprecated fallback): `{"$ref": "http://10.0.0.5/admin.json"}` or `"file:///etc/x.json"`
made the daemon read a URL or a local file on the event loop, outside the egress policy,
and the run's 422 quoted what it read. Here references resolve within the schema only
(its `$defs`, its own `$id`s): anything else, and a `$ref` that loops back on itself, makes
the schema unusable, said once when it is saved and again if a run still meets it.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.exceptions import Unresolvable

NO_RETRIEVAL: Registry[Any] = Registry()  # retrieves nothing: no URL, no file


class UnusableSchema(Exception):
    """The schema cannot check anything: a reference that does not resolve, or loops."""


def validator(schema: Any) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=NO_RETRIEVAL)


def iter_errors(schema: Any, value: Any) -> Any:
    """The schema's errors for `value`, one at a time; UnusableSchema when it cannot be used."""
    try:
        yield from validator(schema).iter_errors(value)
    except Unresolvable as exc:
        ref = str(getattr(exc, "ref", "") or exc)
        shown = ref if len(ref) <= 200 else ref[:200] + "..."
        raise UnusableSchema(
            f"$ref '{shown}' does not resolve: references resolve within the schema only "
            "(its $defs), never to a URL or a file"
        ) from None
    except RecursionError:
        raise UnusableSchema("its $ref references loop back on themselves") from None


def unusable(schema: Any) -> str | None:
    """Why a (valid) schema cannot be used, found by checking an empty input against it;
    None when nothing shows. References only some inputs reach are caught at run time."""
    try:
        for probe in (None, {}):
            for _ in iter_errors(schema, probe):
                pass
    except UnusableSchema as exc:
        return str(exc)
    return None
