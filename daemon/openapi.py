"""The OpenAPI document for the HTTP API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route."""
    return {"openapi": "3.1.0", "info": {"title": "stepd", "version": "0"}, "paths": {}}
