"""Tool registry: named Python callables that steps run.

A tool is a sync or async function taking its args as keyword parameters. If it
declares a parameter named `ctx`, it receives a `ToolContext`. Mark functions
with `@tool` (optionally `@tool("other_name")`) and list the module in the
config's `[tools] modules` (the config file's directory is searched too), or
expose it through the `stepd.tools` entry-point group. Arguments are checked
against the parameters' annotations where those are plain JSON types.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from daemon.egress import Policy
from daemon.errors import ConfigError

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
    annotation: str | None = None  # as written, for GET /api/tools
    accepts: tuple[type, ...] | None = None  # the types an argument may have; None: any


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

    def check_args(self, args: Mapping[str, Any], *, later: Iterable[str] = ()) -> list[str]:
        """Problems with these arguments: unknown, missing, or of the wrong type (except
        those named in `later`: templated values, checked once rendered)."""
        names = set(args)
        known = {p.name for p in self.params}
        problems = []
        if not self.takes_any:
            problems += [f"unknown argument '{n}'" for n in sorted(names - known)]
        problems += [
            f"missing required argument '{p.name}'"
            for p in self.params
            if p.required and p.name not in names
        ]
        skip = set(later)
        for p in self.params:
            if p.name in names and p.name not in skip and p.accepts is not None:
                value = args[p.name]
                if not any(_is(value, t) for t in p.accepts):
                    problems.append(
                        f"argument '{p.name}' must be {_type_text(p.accepts)}, "
                        f"got {_type_text((type(value),))}"
                    )
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


_CHECKED = (str, int, float, bool, list, dict, type(None))


def _accepts(annotation: Any) -> tuple[type, ...] | None:
    """The JSON types an annotation admits; None when it is not checked (Any, classes...)."""
    if annotation is None:
        return (type(None),)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for member in typing.get_args(annotation):
            accepted = _accepts(member)
            if accepted is None:
                return None  # one unchecked member admits anything
            out += accepted
        return tuple(dict.fromkeys(out))
    if origin in (list, dict):  # list[str], dict[str, int]: the container only
        return (origin,)
    return next(((k,) for k in _CHECKED if annotation is k), None)


def _is(value: Any, kind: type) -> bool:
    """Whether a JSON value passes for `kind`: an int is no bool, a float may be an int."""
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_text(kinds: tuple[type, ...]) -> str:
    return " | ".join("None" if k is type(None) else k.__name__ for k in kinds)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations (string ones too); those that cannot be resolved are left out."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # one name imported only under TYPE_CHECKING, say: try them one by one
        pass
    hints = {}
    scope = getattr(fn, "__globals__", {})
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        one = types.SimpleNamespace(__annotations__={name: annotation})
        try:
            hints.update(typing.get_type_hints(one, globalns=scope))
        except Exception:
            continue  # unresolvable: not checked
    return hints


def make_tool(name: str, fn: Callable[..., Any], *, idempotent: bool = True) -> Tool:
    """Inspect `fn` into a Tool description."""
    sig = inspect.signature(fn)
    hints = _hints(fn)
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
            resolved = hints.get(p.name, ann)
            accepts = None
            if resolved is not p.empty and not isinstance(resolved, str):
                accepts = _accepts(resolved)
            required = p.default is p.empty
            default = None if required else p.default
            params.append(Param(p.name, required, default, ann_text, accepts))
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
            raise ConfigError(
                f"tool '{name}' is defined twice: by {_where(self._tools[name].fn)} "
                f"and by {_where(fn)}"
            )
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


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def build_registry(
    modules: Iterable[str], *, search_path: Path | None = None, use_entry_points: bool = True
) -> Registry:
    """Built-ins, then the configured modules, then the `stepd.tools` entry points.

    `search_path` (the config file's directory) is appended to the module search path,
    so a module beside the config is found, while installed modules keep their names.
    Anything that stops a module from loading is a one-line ConfigError.
    """
    from daemon.tools import builtin

    reg = Registry()
    reg.add_module(builtin)
    if search_path is not None and str(search_path) not in sys.path:
        sys.path.append(str(search_path))
        importlib.invalidate_caches()
    for mod_name in modules:
        mod = _import(mod_name, search_path)
        if reg.add_module(mod) == 0:
            raise ConfigError(
                f"[tools] modules: '{mod_name}' ({getattr(mod, '__file__', None) or 'built in'})"
                " defines no @tool functions"
            )
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:
                raise ConfigError(
                    f"entry point '{ep.name}' ({ep.value}) of {ENTRY_POINT_GROUP} failed to "
                    f"load: {_one_line(exc)}"
                ) from None
            if isinstance(obj, ModuleType):
                reg.add_module(obj)
            elif callable(obj):
                mark = getattr(obj, _MARK, {})
                reg.add(ep.name, obj, idempotent=mark.get("idempotent", True))
    return reg


def _import(name: str, search_path: Path | None) -> ModuleType:
    """Import a configured tool module; a failure becomes a one-line ConfigError."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            where = f"the config's directory {search_path} and " if search_path else ""
            raise ConfigError(
                f"[tools] modules: no module named '{name}' (searched {where}the Python path)"
            ) from None
        raise ConfigError(f"[tools] modules: importing '{name}' failed: {_one_line(exc)}") from None
    except Exception as exc:  # anything the module itself raised, SyntaxError included
        raise ConfigError(f"[tools] modules: importing '{name}' failed: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """`Type: message (file, line N)`, where the error was raised, on one line."""
    if isinstance(exc, SyntaxError):
        text, file, line = exc.msg, exc.filename, exc.lineno
    else:
        text = str(exc)
        frames = traceback.extract_tb(exc.__traceback__)
        file, line = (frames[-1].filename, frames[-1].lineno) if frames else (None, None)
    text = " ".join(text.split())
    where = f" ({file}, line {line})" if file else ""
    return f"{type(exc).__name__}: {text}{where}"
