"""Tool registry: named Python callables that steps run.

A tool is a sync or async function taking its args as keyword parameters. If it
declares a parameter named `ctx`, it receives a `ToolContext`. Mark functions
with `@tool` (optionally `@tool("other_name")`) and list the module in the
config's `[tools] modules`, or expose it through the `stepd.tools` entry-point
group.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from daemon.egress import Policy

ENTRY_POINT_GROUP = "stepd.tools"
_MARK = "__stepd_tool__"


class ToolError(Exception):
    """A tool failure; `retryable=False` means another attempt cannot succeed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the step it runs for."""

    workflow_id: int
    step_id: int
    state: str
    attempt: int
    created_by: str | None
    state_dir: Path
    # Named stepd.tool.<tool>; every line it writes carries the step's fields
    # (daemon.logs.StepLogger: a LoggerAdapter, with getChild).
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
    # [executor] max_result_bytes: a tool that reads data in (http) can stop at it.
    max_result_bytes: int = 1_048_576
    # The [http] egress policy; daemon.egress.client(ctx.egress) makes requests that obey it.
    egress: Policy = field(default_factory=Policy)

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of one step: `<workflow_id>:<step_id>`."""
        return f"{self.workflow_id}:{self.step_id}"


@dataclass(frozen=True)
class Param:
    name: str
    required: bool
    default: Any = None
    annotation: str | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    params: tuple[Param, ...]
    takes_ctx: bool
    takes_any: bool  # has **kwargs: any argument name is accepted
    description: str = ""
    idempotent: bool = True

    def check_args(self, names: Iterable[str]) -> list[str]:
        """Problems with passing these argument names (unknown or missing required)."""
        names = set(names)
        known = {p.name for p in self.params}
        problems = []
        if not self.takes_any:
            problems += [f"unknown argument '{n}'" for n in sorted(names - known)]
        problems += [
            f"missing required argument '{p.name}'"
            for p in self.params
            if p.required and p.name not in names
        ]
        return problems

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "async": self.is_async,
            "idempotent": self.idempotent,
            "accepts_any_args": self.takes_any,
            "parameters": [
                {
                    "name": p.name,
                    "required": p.required,
                    "type": p.annotation,
                    **({} if p.required else {"default": _jsonable(p.default)}),
                }
                for p in self.params
            ],
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return repr(value)


def tool(name: str | Callable[..., Any] | None = None, *, idempotent: bool = True) -> Any:
    """Mark a function as a tool: `@tool`, `@tool("name")`, `@tool(idempotent=False)`."""

    def mark(fn: Callable[..., Any], tool_name: str | None = None) -> Callable[..., Any]:
        setattr(fn, _MARK, {"name": tool_name or fn.__name__, "idempotent": idempotent})
        return fn

    if callable(name):
        return mark(name)
    return lambda fn: mark(fn, name)


def make_tool(name: str, fn: Callable[..., Any], *, idempotent: bool = True) -> Tool:
    """Inspect `fn` into a Tool description."""
    sig = inspect.signature(fn)
    params: list[Param] = []
    takes_ctx = takes_any = False
    for p in sig.parameters.values():
        if p.name == "ctx":
            takes_ctx = True
        elif p.kind is p.VAR_KEYWORD:
            takes_any = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            ann = p.annotation
            ann_text = None
            if ann is not p.empty:
                ann_text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
            required = p.default is p.empty
            params.append(Param(p.name, required, None if required else p.default, ann_text))
    doc = inspect.getdoc(fn) or ""
    return Tool(
        name=name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        params=tuple(params),
        takes_ctx=takes_ctx,
        takes_any=takes_any,
        description=doc.split("\n\n")[0].replace("\n", " "),
        idempotent=idempotent,
    )


class Registry:
    """Tools by name."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def add(self, name: str, fn: Callable[..., Any], *, idempotent: bool = True) -> None:
        if name in self._tools and self._tools[name].fn is not fn:
            raise ValueError(f"tool '{name}' is registered twice")
        self._tools[name] = make_tool(name, fn, idempotent=idempotent)

    def add_module(self, module: ModuleType) -> int:
        """Register every @tool-marked function of a module; returns how many."""
        count = 0
        for obj in vars(module).values():
            mark = getattr(obj, _MARK, None)
            if mark is not None and callable(obj):
                self.add(mark["name"], obj, idempotent=mark["idempotent"])
                count += 1
        return count

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)

    def describe(self) -> list[dict[str, Any]]:
        return [self._tools[n].describe() for n in self.names()]


def build_registry(modules: Iterable[str], *, use_entry_points: bool = True) -> Registry:
    """Built-ins, then the configured modules, then the `stepd.tools` entry points."""
    from daemon.tools import builtin

    reg = Registry()
    reg.add_module(builtin)
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        if reg.add_module(mod) == 0:
            raise ValueError(f"tool module '{mod_name}' defines no @tool functions")
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if isinstance(obj, ModuleType):
                reg.add_module(obj)
            elif callable(obj):
                mark = getattr(obj, _MARK, {})
                reg.add(ep.name, obj, idempotent=mark.get("idempotent", True))
    return reg
