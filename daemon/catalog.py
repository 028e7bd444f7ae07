"""The workflow templates stepd ships: ready-made definitions a user installs and edits.

Each is one JSON file in `daemon/templates/` (package data), named after its id:

    {"id": "daily-report", "name", "description", "category", "tags": [...],
     "definition": {<a definition body: name, flow or steps, description, input_schema,
                    concurrency, tags>},
     "example_input": {...}, "notes": [...], "suggested_schedule": {...}}

`example_input` (an input valid for the definition's input_schema), `notes` (how to use
and adapt it) and `suggested_schedule` (a schedule body) are optional. The files are read
once, on first use, and checked then: a malformed file is a packaging error and raises
CatalogError rather than hiding a template. Callers get copies, free to change.
"""

from __future__ import annotations

import copy
import re
import threading
from importlib import resources
from typing import Any

import orjson

PACKAGE = "daemon"
FOLDER = "templates"
ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# A template's fields: required ones with their types, then the optional ones.
REQUIRED = {"id": str, "name": str, "description": str, "category": str, "tags": list,
            "definition": dict}  # fmt: skip
OPTIONAL = {"example_input": dict, "notes": list, "suggested_schedule": dict}
# The keys of a definition body (the /api/workflows contract).
DEFINITION_KEYS = {"name", "flow", "steps", "description", "input_schema", "concurrency", "tags",
                   "webhook", "notify_url"}  # fmt: skip
# Words of the /api/workflows paths: never a definition's name.
RESERVED_NAMES = {"templates", "export", "import", "validate", "runs", "schedules", "recurring"}
SUMMARY_KEYS = ("id", "name", "description", "category", "is_builtin", "tags")

_lock = threading.Lock()
_templates: dict[str, dict[str, Any]] | None = None


class CatalogError(Exception):
    """A shipped template file that is missing a field, malformed or misnamed."""


def list_templates(category: str | None = None) -> list[dict[str, Any]]:
    """Summaries of the shipped templates (id, name, description, category, is_builtin,
    tags), by id; only those of `category` when given."""
    return [
        {key: copy.deepcopy(t[key]) for key in SUMMARY_KEYS}
        for t in _load().values()
        if category is None or t["category"] == category
    ]


def get_template(template_id: str) -> dict[str, Any] | None:
    """The whole template, `definition` included, or None for an unknown id."""
    found = _load().get(template_id)
    return copy.deepcopy(found) if found is not None else None


def definition_for(template_id: str, name: str | None = None) -> dict[str, Any] | None:
    """The definition body to save when installing a template (a copy), named `name`
    when given, else as the template names it; None for an unknown id."""
    found = _load().get(template_id)
    if found is None:
        return None
    definition = copy.deepcopy(found["definition"])
    if name is not None:
        definition["name"] = name
    return definition


def categories() -> list[str]:
    """The categories the shipped templates use, sorted."""
    return sorted({t["category"] for t in _load().values()})


def _load() -> dict[str, dict[str, Any]]:
    global _templates
    if _templates is None:
        with _lock:
            if _templates is None:
                _templates = load_folder(resources.files(PACKAGE) / FOLDER)
    return _templates


def load_folder(folder: Any) -> dict[str, dict[str, Any]]:
    """Every `*.json` template in `folder` (a Traversable or Path), checked, by id."""
    found: dict[str, dict[str, Any]] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        template = parse(entry.name, entry.read_bytes())
        found[template["id"]] = template  # ids are file names: unique by construction
    if not found:
        raise CatalogError(f"no templates in {folder}")
    return dict(sorted(found.items()))


def parse(filename: str, data: bytes) -> dict[str, Any]:
    """One template file checked: its fields and types, its id the file's name, and a
    definition body with either a flow or steps. Raises CatalogError naming the file."""
    try:
        template = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CatalogError(f"{filename}: not JSON: {exc}") from None
    problems = check(template, filename.removesuffix(".json"))
    if problems:
        raise CatalogError(f"{filename}: " + "; ".join(problems))
    return {**template, "is_builtin": True}


def check(template: Any, expected_id: str) -> list[str]:
    """What is wrong with a template object (empty when nothing is)."""
    if not isinstance(template, dict):
        return ["a template must be a JSON object"]
    problems = [
        f"unknown field '{k}'" for k in sorted(set(template) - set(REQUIRED) - set(OPTIONAL))
    ]
    for key, kind in (REQUIRED | OPTIONAL).items():
        if key not in template:
            if key in REQUIRED:
                problems.append(f"field '{key}' is required")
        elif not isinstance(template[key], kind):
            problems.append(f"field '{key}' must be a {kind.__name__}")
    if problems:
        return problems
    if not ID.fullmatch(template["id"]):
        problems.append("field 'id' must be lowercase letters, digits and dashes")
    if template["id"] != expected_id:
        problems.append(f"id '{template['id']}' does not match the file name '{expected_id}'")
    for key in ("name", "description", "category"):
        if not template[key].strip():
            problems.append(f"field '{key}' must not be empty")
    if not all(isinstance(tag, str) and tag for tag in template["tags"]):
        problems.append("field 'tags' must be a list of non-empty strings")
    if not all(isinstance(note, str) and note for note in template.get("notes", [])):
        problems.append("field 'notes' must be a list of non-empty strings")
    definition = template["definition"]
    for key in sorted(set(definition) - DEFINITION_KEYS):
        problems.append(f"definition: unknown field '{key}'")
    name = definition.get("name")
    if not isinstance(name, str) or not name or len(name) > 200 or name.isdigit():
        problems.append("definition: field 'name' must be 1 to 200 characters, not all digits")
    elif name.lower() in RESERVED_NAMES:
        problems.append(f"definition: name '{name}' is reserved")
    if ("flow" in definition) == ("steps" in definition):
        problems.append("definition: needs exactly one of 'flow' or 'steps'")
    concurrency = definition.get("concurrency", 10)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        problems.append("definition: field 'concurrency' must be an integer")
    elif not 1 <= concurrency <= 1000:
        problems.append("definition: field 'concurrency' must be from 1 to 1000")
    if not isinstance(definition.get("description", ""), str):
        problems.append("definition: field 'description' must be a string")
    tags = definition.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag for tag in tags):
        problems.append("definition: field 'tags' must be a list of non-empty strings")
    schema = definition.get("input_schema")
    if schema is not None and not isinstance(schema, dict):
        problems.append("definition: field 'input_schema' must be an object")
    return problems
