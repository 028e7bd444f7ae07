"""The executor: claims runnable steps, runs their tools, and records what follows.

One asyncio loop claims due steps in batches every `poll_interval`, and at once
when woken by the API or by a finished step. Each claimed step runs in its own
task, up to `concurrency` at a time; sync tools run in a thread pool.

Steps that are due the moment they are written skip the claim when there is a
free slot and no due step is queued before them: a new workflow's first step and
a finished step's successor are written as running under this process's lease
("handed off") in the same transaction, and start as soon as it commits. The
claim query (oldest first) is for everything else: backlog beyond the
concurrency, retries, recovered steps, rows written by other processes; while
there is a backlog, new steps join it rather than overtake it.

Each token gets a share of the slots (`Config.running_share`): the store neither
claims nor hands off a step of a token that has that many running; such steps wait
for one of the token's own to finish, which wakes the loop like any finish.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from daemon import egress, metrics, templating
from daemon import flow as flows
from daemon.config import Config
from daemon.errors import StepdError
from daemon.evaluator import Evaluator, SandboxUnavailable
from daemon.logs import StepLogger
from daemon.models import BranchEnd, Branches, Finish, NewStep, Step, StepStatus, WorkflowStatus
from daemon.placeholders import TemplateError, scrub
from daemon.storage import StorageError, StorageUnavailable, WorkflowTooLarge, now_ms
from daemon.storage.base import BaseStore
from daemon.storage.definitions import TooManyChildren
from daemon.templating import Needs, Scope
from daemon.tools import Registry, ToolContext, ToolError

if TYPE_CHECKING:
    from daemon.definitions import Definitions

log = logging.getLogger("stepd.executor")
# Backoff jitter from a generator of our own: the process-wide one belongs to the host
# program (tests seed it, and tools may rely on its sequence).
_jitter = random.Random()
INFO_CACHE = 16 * 2**20  # characters of flows and inputs cached (Executor.remember)


@dataclass(frozen=True)
class WorkflowInfo:
    """The immutable parts of a workflow that running its steps needs."""

    id: int
    name: str
    created_by: str | None
    flow: flows.Flow
    input_json: str  # as stored: expressions parse it only when they read it (Scope)
    size: int = 0  # characters of its flow and input as JSON: what caching it costs
    input_rev: int = 0  # changed by intervene

    def flow_of(self, step: Step) -> flows.Flow:
        """The flow `step` runs in (the workflow's, or a branch's or map's inside it)."""
        return self.flow.resolve(step.path)

    def state(self, step: Step) -> flows.State:
        return self.flow.resolve(step.path)[step.state]


class Postponed(Exception):
    """The step could not start for a fault of the daemon's (the expression sandbox): it
    goes back to the queue, its attempt not counted."""


class StepFailed(Exception):
    """An attempt failed; `retryable` says whether another attempt may help."""

    def __init__(
        self, message: str, *, type_: str, retryable: bool, cause: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.type = type_
        self.retryable = retryable
        self.cause = cause  # an unexpected exception a tool raised: its traceback is logged


class Executor:
    def __init__(self, store: BaseStore, registry: Registry, config: Config) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.egress = egress.policy(config.http_allow, config.http_deny)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: no more grace (see stop())
        self._tasks: dict[int, tuple[asyncio.Task[None], Step]] = {}
        self._cancelled_ids: OrderedDict[int, bool] = OrderedDict()
        self._reserved = 0  # slots promised to hand-offs whose write has not committed yet
        self._records: set[asyncio.Future[Any]] = set()  # outcome writes (and give-backs) under way
        self._grace_over = False  # stop(): running steps are being cancelled
        self._infos: OrderedDict[int, WorkflowInfo] = OrderedDict()
        self._infos_size = 0
        self._flows = flows.ParseCache()
        self._threads = ThreadPoolExecutor(config.concurrency, thread_name_prefix="stepd-tool")
        self.evaluator = Evaluator(template_ms=config.template_ms, template_mb=config.template_mb)
        self._loop_task: asyncio.Task[None] | None = None
        self.last_tick = 0.0  # loop time of the last successful tick, for health checks
        self._next_renewal = 0  # epoch ms when running steps' leases are next renewed
        self._postponed = 0.0  # seconds the last postponed step waits (doubles while it lasts)
        # Another daemon on the database wrote (or news of it may have been lost): look now.
        store.change_hooks.append(lambda kind: kind != "commit" and self.wake())
        store.cancel_hooks.append(self.cancel_steps)
        self._sleep_until = 0.0  # time.monotonic() when the loop's current wait ends
        # Saved definitions, for call states (set by the Engine that owns this executor).
        self.defs: Definitions | None = None

    # -- control ---------------------------------------------------------------------

    def wake(self) -> None:
        """Claim now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        """Start the loop (again, after a stop: a lifespan may run more than once)."""
        self._stopping = asyncio.Event()
        self._grace_over = False
        self._wake = asyncio.Event()
        if self._threads._shutdown:
            self._threads = ThreadPoolExecutor(self.config.concurrency,
                                               thread_name_prefix="stepd-tool")  # fmt: skip
        self.last_tick = asyncio.get_running_loop().time()
        self._loop_task = asyncio.create_task(self.run(), name="stepd-executor")

    @property
    def alive(self) -> bool:
        """The loop is running (it ends only when stopped or on a bug)."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def healthy(self) -> bool:
        """Alive, and a tick succeeded recently (a failing database makes this false)."""
        if not self.alive:
            return False
        stale_after = 3 * self.config.poll_interval + 30
        return asyncio.get_running_loop().time() - self.last_tick < stale_after

    @property
    def running(self) -> int:
        return len(self._tasks)

    # -- hand-off: steps written as running, started without a claim ---------------------

    def reserve(self) -> int | None:
        """A run slot for a step about to be written as running: its lease (ms), or None
        when there is no free slot (or the executor is stopping) and it must be queued."""
        if self._stopping.is_set() or not self.alive:
            return None
        if len(self._tasks) + self._reserved >= self.config.concurrency:
            return None
        self._reserved += 1
        return self._lease_ms

    def release(self, started: Step | None) -> None:
        """Settle a reservation: run the step if it was written as running."""
        self._reserved -= 1
        if started is not None:
            self._start(started, lag_s=0.0)
        else:
            self._wake.set()  # queued instead (or nothing was written): claim it

    def _start(self, step: Step, *, lag_s: float) -> None:
        if self._cancelled_ids.pop(step.id, None) is not None:
            self._wake.set()
            return  # its workflow was cancelled in the transaction that started it
        if self._grace_over:
            self._give_back(step)  # written as running while stop() cancels: never started
            return
        metrics.claimed(lag_s)
        task = asyncio.create_task(self._run(step), name=f"step-{step.id}")
        self._tasks[step.id] = (task, step)
        if self._sleep_until > time.monotonic() + self._lease_ms / 3000:
            # The loop sleeps past this step's first lease renewal (polls further apart
            # than a third of the lease): it must tick in time, or another daemon takes
            # the step while it runs.
            self._wake.set()

        def done(t: asyncio.Task[None], sid: int = step.id) -> None:
            entry = self._tasks.get(sid)
            if entry is not None and entry[0] is t:  # e.g. cancelled before it ever ran
                del self._tasks[sid]
                self._wake.set()

        task.add_done_callback(done)

    def _give_back(self, step: Step) -> None:
        """Return a step that was written as running but never started to the queue, its
        attempt not counted (stop() waits for this write)."""

        async def give_back() -> None:
            try:
                if await self.store.unstart(step, "not started: the daemon is stopping"):
                    log.info("requeued, not started: the daemon is stopping",
                             extra=_fields(step))  # fmt: skip
            except StorageError as exc:  # the store closed: its lease runs out instead
                log.warning("could not requeue a step that did not start (%s)", exc,
                            extra=_fields(step))  # fmt: skip

        self._track(asyncio.ensure_future(give_back()))

    def _track(self, write: asyncio.Future[Any]) -> None:
        self._records.add(write)
        write.add_done_callback(self._records.discard)

    async def run(self) -> None:
        """Tick until stopped: on wake, on the poll interval, or when a retry is due."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            timeout = self.config.poll_interval
            try:
                due = await self.tick()
                if self._tasks:  # leases are renewed on time, not at the next poll
                    due = min(due or self._next_renewal, self._next_renewal)
                if due is not None:
                    timeout = min(timeout, max(0.0, (due - now_ms()) / 1000))
                self.last_tick = loop.time()
                failures = 0
            except Exception as exc:
                # E.g. the disk is full or another process holds the database: back off,
                # and carry on once it clears.
                failures += 1
                timeout = min(self.config.poll_interval * 2**failures, 30.0)
                log.error("executor pass failed (%s); retrying in %.1fs", exc, timeout,
                          exc_info=not isinstance(exc, StorageUnavailable))  # fmt: skip
            self._sleep_until = time.monotonic() + timeout
            waker = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait(
                    {waker, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waker.cancel()
                stopper.cancel()

    async def tick(self, now: int | None = None) -> int | None:
        """One pass: claim due steps up to free capacity and start them.

        Returns when the next pending step becomes due (epoch ms), if known.
        """
        if self._stopping.is_set():
            return None
        now_ = now_ms() if now is None else now
        await self._heartbeat(now_)
        if await self.store.lead("gates"):  # one daemon of several expires gates
            for waiting in await self.store.expired_gates(self.config.claim_batch, now=now):
                if waiting.awaiting == "ready":
                    await self._expire(waiting)
                else:
                    await self._deadline(waiting)
        for step in await self.store.interrupted(limit=self.config.claim_batch, now=now_):
            if step.id not in self._tasks:
                await self.recover_step(step, "its lease expired while it ran")
        free = self.config.concurrency - len(self._tasks) - self._reserved
        if free <= 0:
            return None
        if not await self.store.has_due(now=now_):
            return await self.store.next_due()  # a read: no write transaction for nothing
        want = min(free, self.config.claim_batch)
        self._reserved += want  # hand-offs reserving meanwhile must see these slots as taken
        try:
            claimed = await self.store.claim_steps(want, lease_ms=self._lease_ms, now=now)
        finally:
            self._reserved -= want
        for step in claimed:
            if step.tool is None:
                log.info("gate waiting", extra=_fields(step))
                continue
            self._start(step, lag_s=max(0, (step.started_at or now_) - step.run_at) / 1000)
        if len(claimed) == min(free, self.config.claim_batch):
            self._wake.set()  # there may be more
            return None
        return await self.store.next_due()

    @property
    def _lease_ms(self) -> int:
        return int(self.config.lease_s * 1000)

    async def _heartbeat(self, now: int) -> None:
        """Renew the leases of running steps, a third of the lease before they end."""
        if self._tasks and now >= self._next_renewal:
            await self.store.renew_leases([s for _, s in self._tasks.values()],
                                          now + self._lease_ms)  # fmt: skip
            self._next_renewal = now + self._lease_ms // 3

    async def recover(self) -> int:
        """At start-up: every tool step left running by an earlier process is interrupted."""
        count = 0
        while steps := await self.store.recoverable(limit=500):
            for step in steps:
                await self.recover_step(
                    step, "interrupted: the daemon ended without a clean stop while it ran"
                )
                count += 1
        return count

    async def recover_step(self, step: Step, reason: str) -> None:
        """Requeue an interrupted step, fail it when out of attempts, or, for a tool that is
        not idempotent, let a person decide (it may have had its effect already)."""
        info = await self.workflow_info(step.workflow_id)
        state = info.state(step)
        tool = self.registry.get(step.tool or "")
        if tool is not None and not tool.idempotent:
            why = f"{reason}; tool '{tool.name}' is not idempotent: retry or fail it"
            if await self.store.await_decision(step, why):
                log.warning("waiting for a decision: %s", why, extra=_fields(step))
            return
        if step.attempt < max(state.retry.max_attempts, self.config.recovery_attempts):
            if await self.store.requeue(step, reason):
                log.warning("requeued: %s", reason, extra=_fields(step))
            return
        error = f"{reason}; out of attempts after attempt {step.attempt}"
        fin = failed_for_good(info, step, error, "Interrupted", self.config.step_limit)
        next_id = await self.store.finish_step(fin)
        if next_id is not None:
            log.warning("failed: %s; %s", error, _what_next(fin), extra=_fields(step))
            log_gate_waiting(step.workflow_id, next_id, fin.next_step)

    async def _expire(self, gate: Step) -> None:
        """A gate waited past its timeout: it fails, and the flow goes to on_error or fails."""
        info = await self.workflow_info(gate.workflow_id)
        timeout = info.state(gate).timeout or 0
        error = f"gate expired after {timeout:g}s without a decision"
        fin = failed_for_good(info, gate, error, "GateExpired", self.config.step_limit)
        next_id = await self.store.finish_step(fin)
        if next_id is not None:
            log.info("gate expired", extra=_fields(gate))
            log_gate_waiting(gate.workflow_id, next_id, fin.next_step)

    async def _deadline(self, step: Step) -> None:
        """A wait's timer fired, or a signal wait or a parallel or map step timed out."""
        if step.awaiting == "timer":
            await self.store.wake(step, result_json="null")
            return
        info = await self.workflow_info(step.workflow_id)
        state = info.state(step)
        if step.awaiting == "signal":
            error, type_ = "wait timed out", "WaitTimeout"
        else:
            error, type_ = f"timed out after {state.timeout or 0:g}s", "Timeout"
        if step.awaiting == "child":  # the child workflow is cancelled with it
            woke = await self.store.time_out_call(step, error=error, error_type=type_)
        else:
            woke = await self.store.wake(step, error=error, error_type=type_)
        if woke:
            log.info("%s", error, extra=_fields(step))

    def hurry(self) -> None:
        """Stop at once (a second stop signal): no more grace, before or during stop()."""
        self._hurry.set()

    async def stop(self) -> None:
        """Stop claiming; let running steps finish within the grace period (unless hurried),
        then put the rest back in the queue without counting their attempts."""
        self._stopping.set()
        if self._loop_task is not None:
            await self._loop_task
        # Hand-offs in flight: wait for their writes, however long the commit takes. The
        # store's close() would wait for them anyway; giving up here would leave a step
        # written as running that nobody starts, and after a restart it would count as
        # interrupted (a person asked to decide about a step that never ran).
        while self._reserved:
            await asyncio.sleep(0.01)
        if self._tasks and not self._hurry.is_set():
            await self._grace()
        self._grace_over = True
        leftovers = list(self._tasks.values())
        for task, _ in leftovers:
            task.cancel()
        if leftovers:
            # A tool that swallows cancellation must not hold up the exit.
            await asyncio.wait([t for t, _ in leftovers], timeout=1.0)
        # Outcome writes of cancelled steps go on (shielded); a next step one of them wrote
        # as running is given back to the queue. Bounded: the database may be locked.
        deadline = asyncio.get_running_loop().time() + 5.0
        while self._records and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(self._records), timeout=left)
        for _, step in leftovers:
            await self._put_back(step)
        # Threads of sync tools cannot be interrupted; `stepd serve` exits without
        # joining them (their results would be discarded: the steps are requeued).
        self._threads.shutdown(wait=False, cancel_futures=True)
        await self.evaluator.close()
        # Reset here, not in start(): a second signal during start-up must still count.
        self._hurry = asyncio.Event()

    async def _grace(self) -> None:
        """Wait up to shutdown_grace for running steps to finish, or until hurried."""
        log.info("waiting up to %.1fs for %d running steps", self.config.shutdown_grace,
                 len(self._tasks))  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            # Steps handed off while we wait (a finish already in flight) get the grace too.
            while (running := [t for t, _ in self._tasks.values() if not t.done()]) and (
                left := deadline - loop.time()
            ) > 0 and not hurried.done():  # fmt: skip
                await asyncio.wait([*running, hurried], timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            hurried.cancel()

    async def _put_back(self, step: Step) -> None:
        """A step a planned stop cut off: back in the queue with its attempt given back (a
        stop is no failure of the step), or, for a tool that is not idempotent, waiting for a
        person (it may have had its effect), its attempt given back if they retry it."""
        reason = "cut off by a planned stop (the daemon is stopping); the attempt does not count"
        tool = self.registry.get(step.tool or "")
        try:
            if tool is not None and not tool.idempotent:
                why = f"{reason}; tool '{tool.name}' is not idempotent: retry or fail it"
                if await self.store.await_decision(step, why, stopped=True):
                    log.warning("waiting for a decision: %s", why, extra=_fields(step))
            elif await self.store.unstart(step, reason):
                log.info("requeued: %s", reason, extra=_fields(step))
        except StorageError as exc:  # e.g. locked: its lease runs out, and recovery counts it
            log.warning("could not requeue a step at shutdown (%s)", exc, extra=_fields(step))

    def cancel_steps(self, step_ids: list[int]) -> None:
        """Stop the tools of cancelled steps; their late results are discarded."""
        for step_id in step_ids:
            entry = self._tasks.get(step_id)
            if entry is not None:
                entry[0].cancel()
            else:  # maybe handed off in the same commit and not started yet
                self._cancelled_ids[step_id] = True
                while len(self._cancelled_ids) > 4096:
                    self._cancelled_ids.popitem(last=False)

    # -- running one step ------------------------------------------------------------

    async def _run(self, step: Step) -> None:
        tool = step.tool or ""
        metrics.step_started(tool)
        began = time.perf_counter()
        handed_off = False
        try:
            try:
                fin = await self._attempt(step)
            except asyncio.CancelledError:
                # Cancelled through the API (the store already says so), or at shutdown
                # past the grace period (stop() requeues it).
                return
            except Postponed as exc:
                await self._postpone(step, exc)
                return
            except Exception as exc:  # a bug: fail the workflow rather than leave it hanging
                log.exception("step crashed", extra=_fields(step))
                fin = _crashed(step, f"internal error: {type(exc).__name__}: {exc}")
            if fin is None:  # a parallel, map, wait or call step now waits, holding no slot
                return
            metrics.step_finished(tool, _outcome(fin), time.perf_counter() - began)
            nxt = fin.next_step
            if nxt is not None and nxt.tool is not None and not self._stopping.is_set():
                # This task's slot passes to the next step: written as running, started now.
                fin = replace(fin, start_next_lease_ms=self._lease_ms)
            # Shielded: a cancellation arriving now must not lose the outcome, nor the next
            # step it writes as running (given back to the queue if this task is gone).
            record = asyncio.ensure_future(self._record(step, fin))
            self._track(record)
            try:
                written, started = await asyncio.shield(record)
            except asyncio.CancelledError:
                record.add_done_callback(self._orphaned)
                raise
            if written is None:
                log.info("late result discarded", extra=_fields(step))
            else:
                log_gate_waiting(step.workflow_id, written, fin.next_step)
            if started is not None:
                self._tasks.pop(step.id, None)
                self._start(started, lag_s=0.0)
                handed_off = True
        finally:
            self._tasks.pop(step.id, None)
            if not handed_off:
                self._wake.set()  # a slot is free, and maybe a next step is due

    async def _postpone(self, step: Step, exc: Postponed) -> None:
        """Back to the queue without using an attempt, to run again after a delay that
        grows while the fault lasts."""
        self._postponed = min(self._postponed * 2, 60.0) if self._postponed else 1.0
        reason = f"{exc}; not started, the attempt does not count"
        run_at = now_ms() + int(self._postponed * 1000)
        try:
            if await self.store.unstart(step, reason, run_at=run_at):
                log.warning("requeued for %gs: %s", self._postponed, reason, extra=_fields(step))
        except StorageError as exc2:  # its lease runs out instead
            log.warning("could not requeue (%s)", exc2, extra=_fields(step))

    def _orphaned(self, record: asyncio.Future[Any]) -> None:
        """An outcome write whose step task was cancelled: give back what it started."""
        if not record.cancelled() and record.exception() is None:
            _, started = record.result()
            if started is not None:
                self._give_back(started)

    async def _record(self, step: Step, fin: Finish) -> tuple[int | None, Step | None]:
        """Write an outcome; while the database is busy or locked, keep trying with backoff.

        (None, None) when nothing was written: the attempt no longer owns the step, or the
        store was closed (shutdown; the step's lease runs out and recovery requeues it).
        """
        delay = 0.05
        fell_back = False
        while True:
            if not self.store.is_open:
                log.warning("outcome not recorded: the store is closed", extra=_fields(step))
                return None, None
            try:
                return await self.store.finish_and_start(fin)
            except WorkflowTooLarge as exc:
                log.warning("step failed: %s; the workflow fails", exc, extra=_fields(step))
                fin = too_large(step, str(exc))
            except StorageUnavailable as exc:  # locked / busy past busy_timeout, disk full
                log.warning("recording the outcome failed (%s); retrying in %.2fs", exc, delay,
                            extra=_fields(step))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except (StorageError, OverflowError, UnicodeError, ValueError) as exc:
                if fell_back or not self.store.is_open:
                    log.exception("cannot store even a failure", extra=_fields(step))
                    return None, None
                # The outcome itself cannot be stored: record a plain failure instead.
                log.exception("cannot store the outcome", extra=_fields(step))
                fin = _crashed(step, f"internal error: the outcome could not be stored: {exc}")
                fell_back = True

    async def _attempt(self, step: Step) -> Finish | None:
        info = await self.workflow_info(step.workflow_id)
        state = info.state(step)
        if state.kind in ("parallel", "map", "wait", "call"):
            return await self._composite(info, state, step)
        scope: Scope | None = None
        try:
            if state.templated:
                scope = await self.scope(info, step)
                args = await self._render(state, scope)
            else:
                args = _fresh(state.args)
            result = await self._call(step, args, info)
            result_json = self._encode(result)
            move = await self._branch(info, step, result, scope)
        except StepFailed as exc:
            return self._failure(info, step, exc)
        return self._finish(info, step, move, StepStatus.DONE, result_json=result_json,
                            max_workflow_bytes=self.config.max_workflow_bytes)  # fmt: skip

    async def _composite(self, info: WorkflowInfo, state: flows.State, step: Step) -> Finish | None:
        """A parallel, map, wait or call step. Its first run starts the branches, the wait or
        the child workflow and gives up the run slot (None: nothing more to record now);
        once it is woken (joined, fired, signalled, the child ended, timed out) it runs
        again to move its flow on, like a tool that returned its result or failed."""
        try:
            if step.woken:
                if step.error is not None:
                    raise StepFailed(step.error, type_=step.error_type or "Failed",
                                     retryable=True)  # fmt: skip
                result_json = step.result_json or "null"
            else:
                result_json = await self._begin(info, state, step)
                if result_json is None:
                    return None
            result = orjson.loads(result_json)
            move = await self._branch(info, step, result, None)
        except StepFailed as exc:
            return self._failure(info, step, exc)
        return self._finish(info, step, move, StepStatus.DONE, result_json=result_json,
                            max_workflow_bytes=self.config.max_workflow_bytes)  # fmt: skip

    async def _begin(self, info: WorkflowInfo, state: flows.State, step: Step) -> str | None:
        """Start a parallel's branches, a map's items, a wait or a call's child workflow.
        Returns the state's result when there is nothing to wait for (no items, a time
        already past, a signal that came first), else None."""
        timeout = state.timeout
        expires = None if timeout is None else now_ms() + int(timeout * 1000)
        if state.kind == "call":
            await self._start_child(info, state, step, expires)
            return None
        if state.kind == "parallel":
            assert state.branches is not None
            keys = [(name, None) for name in state.branches]
            firsts = {name: self._first(step, state, name, sub) for name, sub in
                      state.branches.items()}  # fmt: skip
            branches = Branches(keys, len(keys), firsts, self.config.max_workflow_bytes)
            await self._start_branches(step, branches, expires)
            return None
        if state.kind == "map":
            assert state.map is not None
            items = await self._items(info, state, step)
            if not items:
                return "[]"
            keys = [(str(i), orjson.dumps(item).decode()) for i, item in enumerate(items)]
            first = self._first(step, state, "*", state.map.flow)
            branches = Branches(keys, state.map.max_concurrency, {"*": first},
                                self.config.max_workflow_bytes)  # fmt: skip
            await self._start_branches(step, branches, expires)
            return None
        wait = state.wait
        assert wait is not None
        if wait.signal is not None:
            limit = wait.timeout if wait.timeout is not None else timeout
            until = None if limit is None else now_ms() + int(limit * 1000)
            return await self.store.begin_wait(step, awaiting="signal", signal=wait.signal,
                                               expires_at=until)  # fmt: skip
        if wait.seconds is not None:
            until = now_ms() + int(wait.seconds * 1000)
        else:
            value = wait.until
            if isinstance(value, str) and next(templating.expressions(value), None):
                value = await self._value(info, state, step, value, "wait.until")
            until = flows.parse_instant(value)
            if until is None:
                raise StepFailed(f"wait.until gave {templating.truncate_json(value)}; it must "
                                 "be an ISO 8601 time with a time zone or epoch milliseconds",
                                 type_="BadWait", retryable=False)  # fmt: skip
        if until <= now_ms():
            return "null"
        await self.store.begin_wait(step, awaiting="timer", signal=None, expires_at=until)
        return None

    async def _start_child(
        self, info: WorkflowInfo, state: flows.State, step: Step, expires: int | None
    ) -> None:
        """A call step starts a run of a saved definition as its child workflow and waits
        for it (awaiting 'child'); the child's end wakes it with the child's output or
        error. A call that cannot start (no such definition, too deep, input refused by
        the definition's input_schema, ...) fails for good: no retry makes it start."""
        spec = state.call
        assert spec is not None
        if state.templated:
            input_data = await self._render_value(spec.input, await self.scope(info, step),
                                                  "call.input")  # fmt: skip
        else:
            input_data = _fresh(spec.input)
        ref = spec.workflow
        if self.defs is None:  # an executor without an engine (some tests)
            raise StepFailed(f"call state '{state.id}': saved definitions are not available "
                             "here", type_="CallFailed", retryable=False)  # fmt: skip
        parent = await self.store.get_workflow(info.id)
        assert parent is not None  # a running workflow is never deleted
        try:
            run, concurrency = await self.defs.child_run(
                str(ref), spec.version, input_data, parent=parent, step_id=step.id
            )
        except StepdError as exc:
            raise StepFailed(f"call state '{state.id}' cannot start workflow "
                             f"'{_cut(str(ref))}': {_clean(exc.text)}", type_="CallFailed",
                             retryable=False) from None  # fmt: skip
        try:
            child = await self.store.start_child(step, run, concurrency=concurrency,
                                                 expires_at=expires)  # fmt: skip
        except TooManyChildren as exc:
            raise StepFailed(f"call state '{state.id}' cannot start workflow "
                             f"'{_cut(str(ref))}': {exc}", type_="CallFailed",
                             retryable=False) from None  # fmt: skip
        if child is not None:
            log.info("child workflow %d started (%s v%s)", child, run.name,
                     run.definition_version, extra=_fields(step))  # fmt: skip
            self.wake()  # its first step is queued: claim it now

    async def _start_branches(self, step: Step, branches: Branches, expires: int | None) -> None:
        try:
            await self.store.start_branches(step, branches, expires_at=expires)
        except WorkflowTooLarge as exc:
            raise StepFailed(f"its branches would take the workflow past its storage limit: "
                             f"{exc}", type_="StorageLimit", retryable=False) from None  # fmt: skip

    def _first(self, step: Step, state: flows.State, branch: str, sub: flows.Flow) -> NewStep:
        """The first step of a branch (or, with branch "*", of every map item)."""
        scope = orjson.dumps([*step.path, state.id, branch]).decode()
        first = new_step(sub["start"], step.seq + 1)
        return replace(first, parent_id=step.id, branch=None if branch == "*" else branch,
                       scope=scope)  # fmt: skip

    async def _items(self, info: WorkflowInfo, state: flows.State, step: Step) -> list[Any]:
        assert state.map is not None
        items = state.map.items
        if isinstance(items, str):
            items = await self._value(info, state, step, items, "map.items")
        if not isinstance(items, list):
            raise StepFailed(f"map.items gave {templating.truncate_json(items)}, not a list",
                             type_="BadItems", retryable=False)  # fmt: skip
        if len(items) > self.config.max_map_items:
            raise StepFailed(f"map.items has {len(items)} items; the limit is "
                             f"{self.config.max_map_items} ([limits] max_map_items)",
                             type_="TooManyItems", retryable=False)  # fmt: skip
        return items

    async def _value(
        self, info: WorkflowInfo, state: flows.State, step: Step, text: str, where: str
    ) -> Any:
        """One templated value of a state (a map's items, a wait's until)."""
        scope = await self.scope(info, step)
        try:
            return (await self.evaluator.render({"v": text}, scope))["v"]
        except TemplateError as exc:
            raise StepFailed(f"{where}: {exc}", type_="TemplateError", retryable=False) from None
        except SandboxUnavailable as exc:
            raise Postponed(str(exc)) from None

    async def _render_value(self, value: Any, scope: Scope, where: str) -> Any:
        """A templated value other than args (a call's input), rendered (a copy)."""
        try:
            rendered = (await self.evaluator.render({"v": value}, scope))["v"]
            self._postponed = 0.0
            return rendered
        except TemplateError as exc:
            raise StepFailed(f"{where}: {exc}", type_="TemplateError", retryable=False) from None
        except SandboxUnavailable as exc:  # nothing has started: back to the queue
            raise Postponed(str(exc)) from None

    async def _render(self, state: flows.State, scope: Scope) -> Any:
        """The state's args with their placeholders rendered (a copy of its own)."""
        try:
            args = await self.evaluator.render(state.args, scope)
            self._postponed = 0.0
            return args
        except TemplateError as exc:
            raise StepFailed(f"args: {exc}", type_="TemplateError", retryable=False) from None
        except SandboxUnavailable as exc:  # the tool has not run: back to the queue
            raise Postponed(str(exc)) from None

    async def _branch(
        self, info: WorkflowInfo, step: Step, result: Any, scope: Scope | None
    ) -> flows.Move:
        """after_success, waiting while the sandbox cannot be started: the tool has run,
        and a fault of the daemon's must not fail the step (a stop cancels the wait)."""
        delay = 1.0
        while True:
            try:
                return await self.after_success(info, step, result, scope)
            except SandboxUnavailable as exc:
                log.warning("branch not evaluated (%s); trying again in %gs", exc, delay,
                            extra=_fields(step))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def after_success(
        self, info: WorkflowInfo, step: Step, result: Any, scope: Scope | None = None
    ) -> flows.Move:
        """Where the flow goes once `step` succeeded with `result`: a branch's conditions
        are evaluated here, with `result` bound to it (SandboxUnavailable if they could
        not be)."""
        state = info.state(step)
        if not state.branch:
            return flows.after_success(info.flow_of(step), step.state)
        scope = scope if scope is not None else await self.scope(info, step)
        with_result = scope.with_result(orjson.dumps(result).decode())
        try:
            matched = await self.evaluator.choose(state.conditions, with_result)
        except TemplateError as exc:
            return flows.after_success(info.flow_of(step), step.state, error=str(exc))
        return flows.after_success(info.flow_of(step), step.state, matched=matched, result=result)

    async def _call(self, step: Step, args: Any, info: WorkflowInfo) -> Any:
        assert step.tool is not None
        tool = self.registry.get(step.tool)
        if tool is None:
            raise StepFailed(f"unknown tool '{step.tool}'", type_="UnknownTool", retryable=False)
        kwargs = dict(args)
        if tool.takes_ctx:
            kwargs["ctx"] = ToolContext(
                workflow_id=step.workflow_id, step_id=step.id, state=step.state,
                attempt=step.attempt, created_by=info.created_by,
                state_dir=self.config.state_dir,
                logger=StepLogger(logging.getLogger(f"stepd.tool.{tool.name}"), _fields(step)),
                max_result_bytes=self.config.max_result_bytes, egress=self.egress,
            )  # fmt: skip
        problems = tool.check_args(args)
        if problems:
            raise StepFailed(
                f"tool '{tool.name}': {'; '.join(problems)}", type_="BadArguments", retryable=False
            )
        state = info.state(step)
        deadline = asyncio.timeout(state.timeout)
        try:
            async with deadline:
                if tool.is_async:
                    return await tool.fn(**kwargs)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._threads, lambda: tool.fn(**kwargs))
        except TimeoutError as exc:
            if deadline.expired():
                raise StepFailed(f"timed out after {state.timeout:g}s", type_="Timeout",
                                 retryable=True) from None  # fmt: skip
            raise StepFailed(f"TimeoutError: {_clean(str(exc))}", type_="TimeoutError",
                             retryable=True, cause=exc) from None  # fmt: skip
        except ToolError as exc:
            raise StepFailed(_clean(str(exc)), type_="ToolError", retryable=exc.retryable) from None
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # cancelled by us: the workflow was cancelled, or shutdown
            raise StepFailed("tool raised CancelledError", type_="CancelledError",
                             retryable=True, cause=exc) from None  # fmt: skip
        except Exception as exc:
            raise StepFailed(
                f"{type(exc).__name__}: {_clean(str(exc))}",
                type_=type(exc).__name__,
                retryable=True,
                cause=exc,
            ) from None
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, or a custom subclass
            # A tool must not be able to stop the daemon.
            raise StepFailed(
                f"tool raised {type(exc).__name__}",
                type_=type(exc).__name__,
                retryable=False,
                cause=exc,
            ) from None

    def _encode(self, result: Any) -> str:
        try:
            data = orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise StepFailed(
                f"result is not JSON-serialisable: {exc}", type_="BadResult", retryable=False
            ) from None
        if len(data) > self.config.max_result_bytes:
            raise StepFailed(
                f"result is {len(data)} bytes; the limit is {self.config.max_result_bytes}",
                type_="BadResult",
                retryable=False,
            )
        return data.decode()

    def _failure(self, info: WorkflowInfo, step: Step, exc: StepFailed) -> Finish:
        move = flows.after_failure(
            info.flow_of(step),
            step.state,
            str(exc),
            attempt=step.attempt,
            retryable=exc.retryable,
            rand=_jitter.random(),
        )
        if isinstance(move, flows.RetryLater):
            delay_s = min(move.delay_s, flows.MAX_SECONDS)
            log.warning("step failed: %s; retrying in %s", exc, _duration(delay_s),
                        extra=_fields(step), exc_info=exc.cause)  # fmt: skip
            return Finish(
                step_id=step.id,
                workflow_id=step.workflow_id,
                attempt=step.attempt,
                status=StepStatus.PENDING,
                error=str(exc),
                error_type=exc.type,
                retry_at=now_ms() + int(delay_s * 1000),
            )
        finish = self._finish(
            info, step, move, StepStatus.FAILED, error=str(exc), error_type=exc.type
        )
        log.warning("step failed: %s; %s", exc, _what_next(finish), extra=_fields(step),
                    exc_info=exc.cause)  # fmt: skip
        return finish

    def _finish(
        self, info: WorkflowInfo, step: Step, move: flows.Move, status: StepStatus, **fields: Any
    ) -> Finish:
        return finish_for(info, step, move, status, self.config.step_limit, **fields)

    # -- workflow data -----------------------------------------------------------------

    def remember(self, info: WorkflowInfo) -> None:
        """Cache a workflow's parsed flow and its input's text, within INFO_CACHE characters
        of their JSON (a parsed flow takes several times its text); a larger one is read and
        parsed again when needed."""
        if info.id in self._infos or info.size > INFO_CACHE // 16:
            return
        self._infos[info.id] = info
        self._infos_size += info.size
        while self._infos_size > INFO_CACHE or len(self._infos) > 2048:
            _, old = self._infos.popitem(last=False)
            self._infos_size -= old.size

    def forget(self, workflow_id: int) -> None:
        """Drop a workflow's cached info (its input changed)."""
        old = self._infos.pop(workflow_id, None)
        if old is not None:
            self._infos_size -= old.size

    async def workflow_info(self, workflow_id: int) -> WorkflowInfo:
        """The parsed flow and the input of a workflow (cached: they never change)."""
        info = self._infos.get(workflow_id)
        if info is not None and (
            self.store.backend == "sqlite"  # one daemon: intervene here forgets it
            or await self.store.input_rev(workflow_id) == info.input_rev
        ):
            self._infos.move_to_end(workflow_id)
            return info
        wf = await self.store.get_workflow(workflow_id)
        assert wf is not None and wf.flow_json is not None and wf.input_json is not None
        parsed = await self._flows.aparse(wf.flow_json, max_states=1 << 30)
        assert parsed.flow is not None, parsed.errors
        info = WorkflowInfo(wf.id, wf.name, wf.created_by, parsed.flow, wf.input_json,
                            len(wf.flow_json) + len(wf.input_json), wf.input_rev)  # fmt: skip
        self.forget(wf.id)
        self.remember(info)
        return info

    async def scope(self, info: WorkflowInfo, step: Step) -> Scope:
        """What the expressions of `step`'s state may read (see build_scope). Inside a
        branch or map item, `steps` holds the branch's own visits over those of the flows
        around it, `result` is the previous step's in the branch (for its first step, the
        one before the parallel or map step), and a map item adds its value and index."""
        needs = info.state(step).needs
        history: list[Step] = []
        previous = None
        extra: dict[str, str] = {}
        want_steps = "steps" in needs.names and needs.states != frozenset()
        want_previous = bool(needs.names & {"result", "error"})
        at: Step | None = step
        while at is not None:
            if at.parent_id is None:
                if want_steps:
                    outer = await self.store.scope_steps(info.id, at.id, needs.states)
                    history = [*outer, *history]
                if want_previous and previous is None:
                    previous = await self.store.previous_step(info.id, before=at.id)
                break
            assert at.branch is not None
            if want_steps:
                own = await self.store.scope_steps_in(at.parent_id, at.branch, at.id, needs.states)
                history = [*own, *history]
            if want_previous and previous is None:
                previous = await self.store.previous_step_in(at.parent_id, at.branch, at.id)
            path = at.path
            owner = info.flow.resolve(path[:-2])[path[-2]]
            if owner.map is not None and "index" not in extra:
                row = await self.store.branch(at.parent_id, at.branch)
                if row is not None:
                    extra[owner.map.as_] = row["item_json"] or "null"
                    extra["index"] = str(row["idx"])
            at = await self.store.get_step(at.parent_id)
        return build_scope(info, history, previous, needs, extra)


def build_scope(
    info: WorkflowInfo,
    history: list[Step],
    previous: Step | None,
    needs: Needs,
    extra: dict[str, str] | None = None,
) -> Scope:
    """What expressions see: input, steps (the latest visit of each state, oldest first in
    `history`), result (the `previous` step's), error (when it failed), workflow; only the
    names `needs` lists, and only the steps it names, each as its stored JSON text."""
    texts: dict[str, str] = {}
    if "input" in needs.names:
        texts["input"] = info.input_json
    if "steps" in needs.names:
        entries = []
        for s in history:
            if needs.states is None or s.state in needs.states:
                rest = orjson.dumps({"status": s.status, "attempt": s.attempt, "error": s.error})
                entries.append(f'{orjson.dumps(s.state).decode()}:{{"result":'
                               f'{s.result_json or "null"},{rest.decode()[1:]}')  # fmt: skip
        texts["steps"] = "{" + ",".join(entries) + "}"
    if "result" in needs.names:
        texts["result"] = (previous.result_json if previous else None) or "null"
    if "workflow" in needs.names:
        who = {"id": info.id, "name": info.name, "created_by": info.created_by}
        texts["workflow"] = orjson.dumps(who).decode()
    if "error" in needs.names and previous is not None and previous.status == StepStatus.FAILED:
        error = {"type": previous.error_type, "message": previous.error,
                 "state": previous.state, "attempt": previous.attempt}  # fmt: skip
        texts["error"] = orjson.dumps(error).decode()
    for name, text in (extra or {}).items():
        if name in needs.names:
            texts[name] = text
    return Scope(texts)


def finish_for(
    info: WorkflowInfo,
    step: Step,
    move: flows.Move,
    status: StepStatus,
    step_limit: int,
    **fields: Any,
) -> Finish:
    """Turn a pure move into the rows to write."""
    move = flows.limit_steps(move, step.seq, step_limit)
    base = Finish(step_id=step.id, workflow_id=step.workflow_id, attempt=step.attempt,
                  status=status, depth=len(step.path) // 2, **fields)  # fmt: skip
    if isinstance(move, flows.Advance):
        nxt = new_step(info.flow_of(step)[move.target], step.seq + 1)
        nxt = replace(nxt, parent_id=step.parent_id, branch=step.branch, scope=step.scope)
        return replace(base, next_step=nxt)
    if step.parent_id is not None:  # the end of a branch or map item, not of the workflow
        error = move.error if isinstance(move, flows.Fail) else None
        return replace(base, branch_end=_branch_end(info, step, move), workflow_error=error)
    if isinstance(move, flows.Complete):
        return replace(base, workflow_status=WorkflowStatus.COMPLETED)
    assert isinstance(move, flows.Fail)
    return replace(base, workflow_status=WorkflowStatus.FAILED, workflow_error=move.error)


def _branch_end(info: WorkflowInfo, step: Step, move: flows.Move) -> BranchEnd:
    path = step.path
    owner = info.flow.resolve(path[:-2])[path[-2]]  # the parallel or map state
    assert step.parent_id is not None and step.branch is not None
    first = None
    tolerated = 0
    if owner.map is not None:
        tolerated = owner.map.tolerated_failures
        scope = orjson.dumps([*path[:-1], "*"]).decode()
        first = replace(new_step(owner.map.flow["start"], step.seq), scope=scope)
    return BranchEnd(parent_id=step.parent_id, key=step.branch,
                     ok=isinstance(move, flows.Complete), kind=owner.kind, join=owner.join,
                     tolerated=tolerated, first=first)  # fmt: skip


def failed_for_good(
    info: WorkflowInfo, step: Step, error: str, error_type: str, step_limit: int
) -> Finish:
    """A step that failed in a way no retry helps (rejected, expired, out of attempts):
    the flow goes on at on_error, or the workflow fails."""
    move = flows.after_failure(
        info.flow_of(step), step.state, error, attempt=step.attempt, retryable=False, rand=0.0
    )
    return finish_for(info, step, move, StepStatus.FAILED, step_limit, error=error,
                      error_type=error_type)  # fmt: skip


def new_step(state: flows.State, seq: int) -> NewStep:
    """The row for a visit of `state`; a gate with a timeout gets its deadline."""
    timeout_ms = None
    if state.is_gate and state.timeout is not None:
        timeout_ms = int(state.timeout * 1000)
    return NewStep(state=state.id, name=state.name, tool=state.step_tool, seq=seq,
                   timeout_ms=timeout_ms)  # fmt: skip


def too_large(step: Step, error: str) -> Finish:
    """The outcome for a result the workflow may not store: it fails, without on_error
    (whatever it would do next could only store more)."""
    return Finish(step_id=step.id, workflow_id=step.workflow_id, attempt=step.attempt,
                  status=StepStatus.FAILED, error=error, error_type="StorageLimit",
                  workflow_status=WorkflowStatus.FAILED,
                  workflow_error=f"state '{step.state}': {error}")  # fmt: skip


def _crashed(step: Step, error: str) -> Finish:
    """The outcome for a step that broke in stepd itself: it and its workflow fail."""
    error = _clean(error)
    return Finish(step_id=step.id, workflow_id=step.workflow_id, attempt=step.attempt,
                  status=StepStatus.FAILED, error=error, error_type="InternalError",
                  workflow_status=WorkflowStatus.FAILED,
                  workflow_error=f"state '{step.state}': {error}")  # fmt: skip


def _fresh(args: Any) -> Any:
    """A private copy of the args for one attempt: a tool mutating them changes nothing else."""
    try:
        return orjson.loads(orjson.dumps(args))
    except TypeError as exc:  # e.g. an integer beyond 64 bits built by a template
        raise StepFailed(f"args are not JSON: {exc}", type_="BadArguments",
                         retryable=False) from None  # fmt: skip


def _cut(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[:width] + "..."


def _clean(text: str) -> str:
    """A tool's error as stored and shown: lone surrogates escaped (SQLite and JSON must
    store it), object addresses left out (a repr's "at 0x7f..." tells about memory)."""
    return scrub(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def log_gate_waiting(workflow_id: int, step_id: int, step: NewStep | None) -> None:
    """The log line for a gate that was just written (gates start waiting when inserted)."""
    if step is not None and step.tool is None and step_id:
        log.info("gate waiting", extra={"workflow_id": workflow_id, "step_id": step_id,
                                        "state": step.state, "attempt": 1})  # fmt: skip


def _outcome(fin: Finish) -> str:
    if fin.status is StepStatus.PENDING:
        return "retrying"
    return "failed" if fin.status is StepStatus.FAILED else "done"


def _what_next(fin: Finish) -> str:
    """After a step failed for good: the on_error state it goes to, or the end."""
    return f"next: {fin.next_step.state}" if fin.next_step is not None else "the workflow fails"


def _duration(seconds: float) -> str:
    """0.0083s, 1.84s, 90s, 86400s: short, and never in exponent notation."""
    if seconds < 1:
        return f"{seconds:.2g}s"
    return f"{seconds:.3g}s" if seconds < 100 else f"{seconds:.0f}s"


def _fields(step: Step) -> dict[str, Any]:
    return {
        "workflow_id": step.workflow_id,
        "step_id": step.id,
        "state": step.state,
        "attempt": step.attempt,
    }
