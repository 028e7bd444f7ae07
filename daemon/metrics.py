"""Prometheus metrics: counters and histograms fed by the executor and the store, gauges
read from the database when /metrics is scraped.

The recording functions run on the hot path (thousands of calls a second), so each keeps
its labelled children in a dict instead of calling `.labels()` every time. Everything
lives in one registry of its own, so nothing else in the process leaks into /metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from daemon.storage import now_ms
from daemon.storage.base import BaseStore

# No `*_created` series beside every counter and histogram: they double what a scrape
# carries and Prometheus does not use them. (prometheus-client's switch is process-wide:
# metrics a tool module defines for itself lose them too.)
disable_created_metrics()
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # RSS, CPU seconds, open files
PlatformCollector(registry=REGISTRY)  # the Python version

OUTCOMES = ("done", "failed", "retrying")
WORKFLOW_STATUSES = ("running", "completed", "failed", "cancelled")

# Tools run for milliseconds (echo) up to hours (a slow HTTP call with retries).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)  # fmt: skip
# The in-process wake targets single milliseconds; the poll path a poll interval.
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0)  # fmt: skip
# An fsync'd commit takes ~0.3 ms on a fast disk, tens of ms on a slow one.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

STEPS_STARTED = Counter(
    "stepd_steps_started", "Tool steps started (each attempt counts)", ["tool"], registry=REGISTRY
)
STEPS_FINISHED = Counter(
    "stepd_steps_finished",
    "Tool step attempts finished, by outcome: done, failed (for good) or retrying",
    ["tool", "outcome"],
    registry=REGISTRY,
)
STEP_DURATION = Histogram(
    "stepd_step_duration_seconds",
    "How long a tool step attempt ran",
    ["tool"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
CLAIM_LAG = Histogram(
    "stepd_claim_lag_seconds",
    "Seconds from a step becoming due until the executor claimed it (poll lag)",
    buckets=LAG_BUCKETS,
    registry=REGISTRY,
)
COMMIT_DURATION = Histogram(
    "stepd_commit_duration_seconds",
    "How long a write transaction took, from BEGIN to the end of COMMIT",
    buckets=COMMIT_BUCKETS,
    registry=REGISTRY,
)
COMMIT_BATCH = Histogram(
    "stepd_commit_batch_size",
    "Operations (step transitions, creates, decisions) written per transaction",
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)

# Read from the database at scrape time.
STEPS_RUNNABLE = Gauge(
    "stepd_steps_runnable", "Pending steps that are due now (the queue)", registry=REGISTRY
)
STEPS_DELAYED = Gauge(
    "stepd_steps_delayed", "Pending steps not due yet (waiting out a retry's backoff)",
    registry=REGISTRY,
)  # fmt: skip
STEPS_RUNNING = Gauge(
    "stepd_steps_running", "Tool steps running now (holding a lease)", registry=REGISTRY
)
GATES_WAITING = Gauge(
    "stepd_gates_waiting", "Approval gates waiting for a decision (awaiting 'ready')",
    registry=REGISTRY,
)  # fmt: skip
DECISIONS_WAITING = Gauge(
    "stepd_decisions_waiting",
    "Interrupted steps of non-idempotent tools waiting for retry or fail (awaiting 'decision')",
    registry=REGISTRY,
)
WORKFLOWS = Gauge(
    "stepd_workflows", "Workflows in the database, by status", ["status"], registry=REGISTRY
)

# A tick fires within milliseconds of its time while a daemon runs; a catch-up after a
# restart is seconds to minutes late.
SCHEDULE_LAG = Histogram(
    "stepd_schedule_lag_seconds",
    "From a schedule's fire time to its run being created (cron ticks that fired)",
    buckets=LAG_BUCKETS,
    registry=REGISTRY,
)
TICK_OUTCOMES = ("fired", "skipped", "missed", "buffered")
SCHEDULE_TICKS = Counter(
    "stepd_schedule_ticks",
    "Schedule ticks handled by this daemon, by outcome: fired, skipped, missed or buffered",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in TICK_OUTCOMES:  # every outcome shows, zero included
    SCHEDULE_TICKS.labels(outcome=_outcome)

_started: dict[str, Any] = {}
_finished: dict[tuple[str, str], Any] = {}
_durations: dict[str, Any] = {}


def step_started(tool: str) -> None:
    """A tool step's attempt started."""
    child = _started.get(tool)
    if child is None:
        child = _started[tool] = STEPS_STARTED.labels(tool=tool)
    child.inc()


def step_finished(tool: str, outcome: str, seconds: float) -> None:
    """A tool step's attempt ended: `outcome` is done, failed or retrying."""
    child = _finished.get((tool, outcome))
    if child is None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        child = _finished[(tool, outcome)] = STEPS_FINISHED.labels(tool=tool, outcome=outcome)
    child.inc()
    duration = _durations.get(tool)
    if duration is None:
        duration = _durations[tool] = STEP_DURATION.labels(tool=tool)
    duration.observe(seconds)


def claimed(lag_seconds: float) -> None:
    """A step was claimed `lag_seconds` after it became due (negative clock skew counts 0)."""
    CLAIM_LAG.observe(max(0.0, lag_seconds))


def ticked(outcome: str, lag_seconds: float | None = None) -> None:
    """A schedule tick was recorded; `lag_seconds` for a cron tick that fired."""
    SCHEDULE_TICKS.labels(outcome=outcome).inc()
    if lag_seconds is not None:
        SCHEDULE_LAG.observe(max(0.0, lag_seconds))


def committed(seconds: float, batch_size: int) -> None:
    """A write transaction of `batch_size` operations committed in `seconds`."""
    COMMIT_DURATION.observe(seconds)
    COMMIT_BATCH.observe(batch_size)


async def refresh(store: BaseStore, *, now: int | None = None) -> None:
    """Set the gauges that describe the database now."""
    gauges = await store.gauges(now_ms() if now is None else now)
    STEPS_RUNNABLE.set(gauges.runnable)
    STEPS_DELAYED.set(gauges.delayed)
    STEPS_RUNNING.set(gauges.running)
    GATES_WAITING.set(gauges.gates_waiting)
    DECISIONS_WAITING.set(gauges.decisions_waiting)
    for status in WORKFLOW_STATUSES:
        WORKFLOWS.labels(status=status).set(gauges.workflows.get(status, 0))


async def render(store: BaseStore, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition (Prometheus text, or OpenMetrics when `accept` asks for it) and its
    content type, after refreshing the database gauges."""
    await refresh(store)
    try:
        encode, content_type = choose_encoder(accept or "")
    except (TypeError, ValueError):  # e.g. "version=abc": the client parser trips on it
        encode, content_type = choose_encoder("")  # the Prometheus text format
    return encode(REGISTRY), content_type
