"""Where expressions run: plain paths in the daemon, everything else in a sandbox process.

The sandbox process (`python -m daemon.evaluator`, started on first use, at most
WORKERS of them) evaluates one request at a time: the args of a step or the
conditions of a branch, with the part of the scope they use, sent as the JSON text it
is stored as. The daemon watches its CPU time and memory while it works and kills it
past `[limits] template_ms` of CPU per expression or `template_mb` of growth, parsing
the scope included; a C-level loop (a quadratic filter, a huge repeat) cannot hold the
daemon's event loop, because it never runs there. A killed process is replaced on the
next request.

Frames on the pipes: a 4-byte big-endian length, then JSON. The daemon sends the
limits (`{"ms", "mb", "max_out"}`, so that they apply to reading what follows), then
the request; the process answers `{"value": ...}`, `{"index": n}` or `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import resource
import struct
import sys
import time
from pathlib import Path
from typing import IO, Any

import orjson

from daemon import sandbox
from daemon.limits import MAX_ERROR
from daemon.placeholders import TemplateError, expressions, parse_off_loop, quoted
from daemon.templating import (
    Budget,
    Fallback,
    Scope,
    is_plain,
    parsed_size,
    render_plain,
    truthy_plain,
)

log = logging.getLogger("stepd.evaluator")
FRAME = struct.Struct(">I")
WORKERS = 2  # sandbox processes at most: requests beyond wait for one
COMMAND = (sys.executable, "-m", "daemon.evaluator")  # how a sandbox process is started
POLL_S = 0.005  # how often a working process's CPU time and memory are read
COMPILE_MS = 40  # CPU allowed per expression for compiling it (once per process)
PARSE_MS_PER_MB = 100  # CPU allowed for parsing the request, per megabyte
PER_STEP = 10  # one step's expressions together: at most this many times template_ms
RECYCLE_MB = 256  # an idle sandbox process larger than this is replaced
START_TIMEOUT_S = 10.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_ROOT = str(Path(sandbox.__file__).resolve().parent.parent)  # where the `daemon` package is
_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


class SandboxUnavailable(Exception):
    """The sandbox process could not be started or died for a reason of its own."""


class Evaluator:
    """Renders args and picks branches; see the module docstring."""

    def __init__(self, *, template_ms: float = 50.0, template_mb: int = 64) -> None:
        self.ms = template_ms
        self.mb = template_mb
        self.max_out = template_mb * 2**20 // 8  # rendered args, as JSON
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self.failing: str | None = None  # why the last start failed, until one succeeds
        self._warned = False

    @property
    def healthy(self) -> bool:
        """False while the sandbox process cannot be started (for /healthz)."""
        return self.failing is None

    async def render(self, value: Any, scope: Scope) -> Any:
        """`value` with its placeholders rendered, for this step alone (a tool may change it)."""
        exprs = list(expressions(value))
        if is_plain(exprs):
            data = await scope.parse(self.mb * 2**20)  # fresh objects: no copy needed
            try:
                return render_plain(value, data, Budget(self.ms, self.max_out, self.mb * 2**20))
            except Fallback:
                pass  # a miss the sandbox words better; it reads plain paths too
        reply = await self._ask(b'"op":"render","value":' + orjson.dumps(value), scope, exprs)
        return reply["value"]

    async def choose(self, conditions: list[str], scope: Scope) -> int:
        """The index of the first condition that holds, or -1."""
        if is_plain(conditions):
            data = await scope.parse(self.mb * 2**20)
            try:
                return next((i for i, c in enumerate(conditions) if truthy_plain(c, data)), -1)
            except Fallback:
                pass
        reply = await self._ask(
            b'"op":"choose","conditions":' + orjson.dumps(conditions), scope, conditions
        )
        return int(reply["index"])

    async def _ask(self, request: bytes, scope: Scope, exprs: list[str]) -> Any:
        payload = b"{" + request + b',"scope":' + scope.payload().encode() + b"}"
        # Shielded: a caller that goes away (a cancelled workflow) must not leave the
        # process half-way through a reply; the exchange ends within its limits anyway.
        task = asyncio.ensure_future(self._exchange(payload, exprs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        reply = await asyncio.shield(task)
        if "error" in reply:
            raise TemplateError(reply["error"])
        return reply

    async def _exchange(self, payload: bytes, exprs: list[str]) -> dict[str, Any]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(WORKERS)
        async with self._slots:
            worker = await self._worker()
            try:
                return await worker.exchange(payload, exprs, self)
            finally:
                if worker.alive and worker._usage()[0] > RECYCLE_MB * 2**20:
                    await worker.kill()  # grown (caches, fragmentation): start afresh
                if worker.alive:
                    self._idle.append(worker)

    async def _worker(self) -> _Worker:
        """An idle sandbox process that is still alive (one may have been killed from
        outside meanwhile), or a new one."""
        while self._idle:
            worker = self._idle.pop()
            if worker.proc.returncode is None:
                return worker
            await worker.kill()
        try:
            worker = await _Worker.start()
        except SandboxUnavailable as exc:
            if self.failing is None:
                log.error("%s; steps that need it wait and are retried", exc)
            self.failing = str(exc)
            raise
        if self.failing is not None:
            log.warning("the expression sandbox starts again")
            self.failing = None
        if not worker.limits_memory and not self._warned:
            self._warned = True
            log.warning("the expression sandbox cannot limit its own address space "
                        "(setrlimit refused); the daemon watches its memory instead")  # fmt: skip
        return worker

    async def close(self) -> None:
        """Stop every sandbox process (requests under way fail)."""
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        idle, self._idle = self._idle, []
        for worker in idle:
            await worker.kill()


class _Worker:
    """One sandbox process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.alive = True
        self.limits_memory = True  # whether it can set its own RLIMIT_AS

    @classmethod
    async def start(cls) -> _Worker:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p),
            # One malloc arena: a second thread (the last-resort timer, see _handle) would
            # otherwise reserve 64 MB of address space, all of RLIMIT_AS's allowance.
            "MALLOC_ARENA_MAX": "1"}  # fmt: skip
        try:
            # A session of its own: a Ctrl-C in the daemon's terminal is for the daemon.
            proc = await asyncio.create_subprocess_exec(
                *COMMAND, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise SandboxUnavailable(f"cannot start the expression sandbox: {exc}") from None
        worker = cls(proc)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = orjson.loads(await worker._frame(1024))
        except TimeoutError:
            await worker.kill()
            raise SandboxUnavailable(
                f"the expression sandbox did not start within {START_TIMEOUT_S:g} s"
            ) from None
        except (SandboxUnavailable, asyncio.IncompleteReadError, ValueError):
            await worker.kill()
            raise SandboxUnavailable(
                f"the expression sandbox did not start (exit status {proc.returncode})"
            ) from None
        except BaseException:
            await worker.kill()
            raise
        if not ready.get("ready"):
            await worker.kill()
            raise SandboxUnavailable("the expression sandbox did not start")
        worker.limits_memory = bool(ready.get("limits_memory"))
        log.debug("expression sandbox started (pid %d)", proc.pid)
        return worker

    async def exchange(self, payload: bytes, exprs: list[str], ev: Evaluator) -> dict[str, Any]:
        try:
            return await self._exchange(payload, exprs, ev)
        except (ConnectionError, asyncio.IncompleteReadError):
            await self.kill()
            raise SandboxUnavailable(
                f"the expression sandbox stopped (exit status {self.proc.returncode})"
            ) from None
        except BaseException:
            await self.kill()  # cancelled half-way: the pipe's state is unknown
            raise

    async def _exchange(self, payload: bytes, exprs: list[str], ev: Evaluator) -> dict[str, Any]:
        rss0, cpu0 = self._usage()  # idle, before it reads the request: parsing it counts
        cpu_limit = (min(len(exprs), PER_STEP) * (ev.ms + COMPILE_MS)
                     + PARSE_MS_PER_MB * len(payload) / 2**20)  # fmt: skip
        wall_limit = time.monotonic() + wall_s(cpu_limit)
        limits = orjson.dumps({"ms": ev.ms, "mb": ev.mb, "max_out": ev.max_out,
                               "wall_s": wall_s(cpu_limit)})  # fmt: skip
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(FRAME.pack(len(limits)) + limits + FRAME.pack(len(payload)) + payload)
        reply = asyncio.ensure_future(self._reply(ev))
        try:
            while True:
                done, _ = await asyncio.wait({reply}, timeout=POLL_S)
                if done:
                    answer: dict[str, Any] = reply.result()
                    if answer.pop("exit", False):
                        await self.kill()
                    return answer
                rss, cpu = self._usage()
                if rss - rss0 > ev.mb * 2**20:
                    await self.kill()
                    return {"error": f"{_which(exprs)} and the data it reads used more than "
                                     f"{ev.mb} MB ([limits] template_mb)"}  # fmt: skip
                if cpu - cpu0 > cpu_limit or time.monotonic() > wall_limit:
                    await self.kill()
                    return {"error": f"{_which(exprs)} took more than {ev.ms:g} ms "
                                     "([limits] template_ms)"}  # fmt: skip
        finally:
            reply.cancel()  # a process killed above ends its read with an error: consume it
            with contextlib.suppress(BaseException):
                await reply

    async def _reply(self, ev: Evaluator) -> dict[str, Any]:
        """The answer to a request; rendered args that would take more than template_mb once
        parsed are refused before they are (large ones are parsed in a thread)."""
        stdin = self.proc.stdin
        assert stdin is not None
        await stdin.drain()
        frame = await self._frame(ev.max_out + 1024)
        if parsed_size(frame) > ev.mb * 2**20:
            return {"error": f"the rendered args would take more than {ev.mb} MB once parsed "
                             "([limits] template_mb)"}  # fmt: skip
        answer: dict[str, Any] = await parse_off_loop(frame)
        return answer

    async def _frame(self, max_size: int) -> bytes:
        stdout = self.proc.stdout
        assert stdout is not None
        (size,) = FRAME.unpack(await stdout.readexactly(FRAME.size))
        if size > max_size:
            raise SandboxUnavailable(f"the expression sandbox sent {size} bytes")
        return await stdout.readexactly(size)

    def _usage(self) -> tuple[int, float]:
        """(resident bytes, CPU ms) of the process; zeros where /proc cannot tell."""
        try:
            with open(f"/proc/{self.proc.pid}/statm", "rb") as fh:
                rss = int(fh.read().split()[1]) * _PAGE
            with open(f"/proc/{self.proc.pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            return rss, (int(fields[11]) + int(fields[12])) * _TICK_MS  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0, 0.0

    async def kill(self) -> None:
        self.alive = False
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def wall_s(cpu_limit_ms: float) -> float:
    """The longest a request may take on the clock (a process starved of CPU): after it,
    the daemon kills the process, and the process ends itself (see _handle)."""
    return 1 + 4 * cpu_limit_ms / 1000


def _which(exprs: list[str]) -> str:
    worked = [e.strip() for e in exprs if not is_plain([e])]
    return quoted(worked[0]) if len(worked) == 1 else "an expression"


# -- the sandbox process -----------------------------------------------------------------


def _send(out: IO[bytes], message: dict[str, Any]) -> None:
    data = orjson.dumps(message)
    out.write(FRAME.pack(len(data)) + data)
    out.flush()


def _handle(limits: dict[str, Any], read: Any) -> dict[str, Any]:
    """Read one request (with `read()`, under the memory limit: the scope counts) and
    answer it. Past the request's time on the clock this process ends itself, from a C
    thread that needs no GIL: the daemon's own watch runs on its event loop, which some
    other work could be holding just then."""
    mb = limits["mb"]
    faulthandler.dump_traceback_later(limits["wall_s"], exit=True, file=_QUIET)
    try:
        with _memory_limit(mb):
            frame = read()
            if frame is None:
                return {"error": "the daemon went away", "exit": True}
            request = orjson.loads(frame)
            clock = sandbox.Clock(limits["ms"], total_ms=limits["ms"] * PER_STEP)
            scope = request["scope"]
            if request["op"] == "choose":
                return {"index": sandbox.first_true(request["conditions"], scope, clock)}
            value = sandbox.render_value(request["value"], scope, clock)
            data = orjson.dumps(value)
    except TemplateError as exc:
        return {"error": str(exc)[:MAX_ERROR]}
    except (MemoryError, orjson.JSONDecodeError):  # orjson: "not enough memory"
        return {"error": f"an expression and the data it reads used more than {mb} MB "
                         "([limits] template_mb)", "exit": True}  # fmt: skip
    except TypeError as exc:  # orjson: e.g. an integer beyond 64 bits
        return {"error": f"the rendered args are not JSON: {exc}"}
    finally:
        faulthandler.cancel_dump_traceback_later()
    if len(data) > limits["max_out"]:
        return {"error": f"the rendered args are {len(data)} bytes as JSON; the limit is "
                         f"{limits['max_out']} ([limits] template_mb / 8)"}  # fmt: skip
    return {"value": orjson.Fragment(data)}


@contextlib.contextmanager
def _memory_limit(mb: int) -> Any:
    """Address space for this request: what is mapped now plus `mb` (where allowed; the
    daemon also watches the resident size and kills the process past it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm", "rb") as fh:
            mapped = int(fh.read().split()[0]) * _PAGE
        limit = mapped + mb * 2**20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):  # e.g. a seccomp filter refusing setrlimit
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


_QUIET: IO[str] = sys.stderr  # where the last-resort exit writes: /dev/null in the sandbox


def main() -> None:
    global _QUIET
    _QUIET = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the frames
    sys.stdout = sys.stderr
    with contextlib.suppress(OSError):
        os.nice(5)  # a runaway expression yields the CPU to the daemon (where allowed)
    inp = sys.stdin.buffer
    _send(out, {"ready": True, "limits_memory": _can_limit_memory()})
    while True:
        limits = _receive(inp)
        if limits is None:
            return  # the daemon closed the pipe (it stopped, or died)
        reply = _handle(orjson.loads(limits), lambda: _receive(inp))
        try:
            _send(out, reply)
        except OSError:  # BrokenPipeError: the daemon is gone
            return
        if reply.get("exit"):
            return


def _can_limit_memory() -> bool:
    """Whether setrlimit(RLIMIT_AS) is allowed here (a seccomp filter may refuse it)."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, resource.getrlimit(resource.RLIMIT_AS))
    except (OSError, ValueError):
        return False
    return True


def _receive(inp: IO[bytes]) -> bytes | None:
    header = inp.read(FRAME.size)
    if len(header) < FRAME.size:
        return None
    (size,) = FRAME.unpack(header)
    frame = inp.read(size)
    return frame if len(frame) == size else None


if __name__ == "__main__":
    main()
