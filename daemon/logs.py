"""Log output: readable lines for people and journald, or one JSON object per line.

Lines about a step carry its workflow_id, step_id, state and attempt (the executor passes
them with `extra=`), so one grep or one query finds everything that happened to a step.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

STEP_FIELDS = ("workflow_id", "step_id", "state", "attempt")
# uvicorn logs through these; they must reach our handler, not print on their own.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
HANDLER_NAME = "stepd"
# Attributes every LogRecord has: whatever else a record carries came in through `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# uvicorn's copy of the message with terminal colours in it.
_IGNORED = {"color_message"}


class StepLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose every line carries a step's fields, on top of the caller's own
    `extra` (Python 3.11's adapter would replace them). What tools get as `ctx.logger`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs

    def getChild(self, suffix: str) -> StepLogger:  # noqa: N802 - logging.Logger's name
        return StepLogger(self.logger.getChild(suffix), self.extra)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed with `extra=`: the step's four first, in a fixed order."""
    fields = {k: record.__dict__[k] for k in STEP_FIELDS if k in record.__dict__}
    for key, value in record.__dict__.items():
        if key not in _STANDARD and key not in _IGNORED and key not in fields:
            fields[key] = value
    return fields


def _logfmt(value: Any) -> str:
    """A value as `key=value` shows it: bare when unambiguous, else JSON-quoted."""
    text = value if isinstance(value, str) else str(value)
    if text and not any(c.isspace() or c in '="\\' for c in text) and text.isprintable():
        return text
    return orjson.dumps(text).decode()


class TextFormatter(logging.Formatter):
    """`LEVEL logger: message key=value ...`, without a timestamp: journald adds one."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, the extra
    fields, and `exception` / `stack` as text; never more than one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for `[server] log_format`: "text" or "json"."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f'log_format must be "text" or "json", not {log_format!r}')


def setup(level: str, log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record, uvicorn's included, to `stream` (stderr) in `log_format`.

    Replaces the handler an earlier call installed and leaves other handlers alone (a
    test runner's capture, say). Returns the handler, so a caller can remove it again.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        # uvicorn's default config gives these handlers of their own; the daemon passes
        # log_config=None, and this makes sure nothing else did either.
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True
    return handler
