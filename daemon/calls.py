"""What a run waits for, through the child workflows of its call states.

A call step waits with `"awaiting": "child"` while its child runs; whether the run as a
whole stopped to wait for a person, a signal or a timer (a synchronous execute answers
202 then) depends on what the child, and the children of its own calls, wait for.
"""

from __future__ import annotations

from typing import Any

from daemon.storage.base import BaseStore

WAITS = frozenset({"ready", "decision", "signal", "timer"})  # a person, a signal, a timer
MAX_LEVELS = 6  # a run and its children (calls nest at most 5 deep)


async def stopped_waiting(store: BaseStore, workflow_id: int) -> list[dict[str, Any]] | None:
    """The steps a running workflow waits at when nothing in it, nor in the children its
    call steps wait for, runs or is due: [{"workflow_id", "step_id", "state",
    "awaiting"}], a child's before its parent's later ones. None when something runs or
    is queued to run, or the workflow is not running (ended, paused, queued)."""
    return await _waiting(store, workflow_id, 0)


async def _waiting(store: BaseStore, workflow_id: int, level: int) -> list[dict[str, Any]] | None:
    wf = await store.get_workflow(workflow_id)
    if wf is None or wf.public_status != "running" or level >= MAX_LEVELS:
        return None
    out: list[dict[str, Any]] = []
    for step in await store.steps(workflow_id):
        if step.status not in ("pending", "running"):
            continue
        if step.status == "pending" or step.awaiting is None:
            return None  # due, retrying or running
        if step.awaiting in WAITS:
            out.append({"workflow_id": workflow_id, "step_id": step.id, "state": step.state,
                        "awaiting": step.awaiting})  # fmt: skip
        elif step.awaiting == "child" and step.child_id is not None:
            inner = await _waiting(store, step.child_id, level + 1)
            if inner is None:
                return None
            out += inner
        elif step.awaiting != "branches":  # a parallel or map: its inner steps are listed
            return None
    return out or None
