"""Webhooks: the event log feeds a durable outbox; signed POSTs deliver it, with retries.

Enqueueing and moving the read cursor are one transaction, and the outbox holds each
(event, URL) once, so a crash neither loses nor duplicates a notification. Delivery is
at least once: a receiver sees a delivery again (same X-Stepd-Delivery) if the daemon
stopped between its answer and our record of it.

Deliveries are isolated per destination (scheme, host, port): each has a few in flight
at most, workflows' own receivers share a global limit, and the operator's URL has
slots of its own, so a slow receiver delays only its own deliveries. Every connection
obeys the egress policy (daemon.egress); a refused delivery is given up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from daemon import egress, links, signing
from daemon import flow as flows
from daemon.auth import webhook_secret
from daemon.config import Config
from daemon.models import Step, Workflow
from daemon.storage import Row, now_ms
from daemon.storage.base import BaseStore

log = logging.getLogger("stepd.notify")
_jitter = random.Random()  # retry jitter, not the process-wide generator
EVENTS = frozenset({"gate_waiting", "completed", "failed", "cancelled", "schedule_fired"})
MAX_INPUT = 16384  # bytes of a workflow's input sent with each notification
CURSOR = "webhooks"
BATCH = 500  # events read per query
OPERATOR = "operator"  # the destination key of the [webhooks] url's deliveries
OPERATOR_CONCURRENCY = 4  # deliveries in flight to the [webhooks] url, on slots of its own
PER_DESTINATION = 2  # in flight to one receiver of workflows' own notify_url
CONCURRENCY = 16  # in flight to workflows' own receivers, all together
TIMEOUT_S = 10.0
# A delivery one daemon took is not taken by another for this long (it dies sending it).
VISIBILITY_MS = 60_000
BACKOFF_S = 1.0  # the n-th retry waits about BACKOFF_S * 2**n; tests make it tiny
MAX_BACKOFF_S = 3600.0
IDLE_WAIT_S = 1.0  # longest sleep between passes when nothing is written
MIN_PASS_S = 0.05  # under a stream of commits, passes are at least this far apart
SHUTDOWN_GRACE_S = 2.0  # how long a stop waits for deliveries under way
SAVE_EVERY_S = 10.0  # a cursor that passed only unwatched events is saved this often


def sign(secret: bytes, ts: int, body: bytes) -> str:
    """The X-Stepd-Signature value: "v1=" + hex HMAC-SHA256(secret, "<ts>." + body)."""
    return "v1=" + hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()


def retry_delay(attempts: int, rand: float) -> float:
    """Seconds to wait after `attempts` failed tries: doubling, capped, jittered by ±25 %."""
    return min(MAX_BACKOFF_S, BACKOFF_S * 2**attempts) * (0.75 + rand / 2)


def build_body(
    event: dict[str, Any], wf: Workflow, step: Step | None, urls: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON POSTed for one event (`urls`: the one-click links of a waiting gate). An
    input over MAX_INPUT bytes is left out (`null`, with its size): each delivery is
    stored until sent, and a looping workflow makes many."""
    text = wf.input_json or "{}"
    size = len(text.encode())
    body: dict[str, Any] = {
        "event": event["type"], "event_id": event["id"], "at": event["at"],
        "workflow": {"id": wf.id, "name": wf.name, "status": wf.status,
                     "created_by": wf.created_by, "error": wf.error,
                     "input": orjson.Fragment(text) if size <= MAX_INPUT else None,
                     "input_bytes": size},
    }  # fmt: skip
    if event["type"] == "schedule_fired" and event.get("data"):
        data = event["data"]
        body["schedule"] = {"schedule_id": data.get("schedule_id"),
                            "workflow_id": wf.definition_id, "workflow_name": wf.name}  # fmt: skip
        body["tick"] = {"id": data.get("tick_id"), "kind": data.get("kind"),
                        "fire_time": _utc(data.get("fire_at")), "outcome": "fired",
                        "run_id": wf.id, "reason": None}  # fmt: skip
    if step is not None:
        body["step"] = {"id": step.id, "name": step.name, "state": step.state}
    if urls:
        body["links"] = urls
    return body


def _utc(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def tick_body(row: Row) -> dict[str, Any]:
    """The JSON POSTed for a skipped or missed schedule tick (it started no workflow)."""
    return {
        "event": f"schedule_{row['outcome']}",
        "event_id": -int(row["id"]),  # ticks and events share the outbox's (event, URL) key
        "at": row["recorded_at"],
        "schedule": {"schedule_id": row["schedule_id"], "workflow_id": row["definition_id"],
                     "workflow_name": row["definition_name"],
                     "cron_expression": row["cron"], "timezone": row["timezone"]},
        "tick": {"id": row["id"], "kind": row["kind"], "fire_time": _utc(row["fire_at"]),
                 "outcome": row["outcome"], "run_id": row["run_id"], "reason": row["reason"]},
    }  # fmt: skip


def destination(url: str) -> str:
    """A receiver's "scheme://host:port", the unit deliveries are limited by."""
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        return url  # cannot be sent anyway; a destination of its own
    host = f"[{u.host}]" if ":" in u.host else u.host
    return f"{u.scheme}://{host}:{u.port or (443 if u.scheme == 'https' else 80)}"


def targets(config: Config, wf: Workflow) -> list[tuple[str, bool]]:
    """(url, chosen by the operator) for each URL a workflow's events go to."""
    out = [(config.webhook_url, True)] if config.webhook_url else []
    if wf.notify_url and wf.notify_url != config.webhook_url:
        out.append((wf.notify_url, False))
    return out


class Notifier:
    def __init__(self, store: BaseStore, config: Config) -> None:
        self.store, self.config = store, config
        self.cursor: int | None = None  # read up to here
        self.saved = 0  # the cursor as stored
        self.saved_at = float("-inf")  # monotonic time of the last save
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.lanes: dict[str, int] = {}  # destination -> deliveries in flight
        self.client: httpx.AsyncClient | None = None
        self._secret: bytes | None = None

    def server_secret(self) -> bytes:
        """The daemon's own key, for the one-click links."""
        return signing.secret(self.config.state_dir)

    def webhook_secret(self) -> bytes:
        if self._secret is None:  # not shared by the database: the state directory's
            self._secret = webhook_secret(self.config.state_dir)
        return self._secret

    async def run(self) -> None:
        failures = 0
        self._secret = await self.store.secret("webhook")  # None: the state directory's
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.enqueue(time.time())
                    await self.deliver()
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("webhooks: a pass failed (%d in a row); retrying", failures)
                    await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                await self.store.wait_for_change(IDLE_WAIT_S)
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    # Python 3.11's wait_for drops a cancel that lands as the wait ends.
                    raise asyncio.CancelledError
                await asyncio.sleep(max(0.0, started + MIN_PASS_S - time.monotonic()))
        finally:
            # Let POSTs under way finish briefly: a cancelled one is sent again after restart.
            if self.inflight:
                await asyncio.wait(list(self.inflight.values()), timeout=SHUTDOWN_GRACE_S)
            tasks = list(self.inflight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.client is not None:
                await self.client.aclose()

    async def enqueue(self, now: float) -> None:
        """Turn new events into outbox rows; the cursor moves in the same transaction.
        Of several daemons on one database, one does this (the others only send)."""
        if not await self.store.lead("notifier"):
            self.cursor = None  # read again from the database when this one leads
            return
        if self.cursor is None:
            self.cursor = self.saved = await self.store.cursor(CURSOR)
        while True:
            # Only the kinds of event that notify are read (in SQL); `up_to` says how far
            # the log was covered, the others included.
            # Without an operator's URL only workflows with their own notify_url notify.
            events, up_to, caught_up = await self.store.events_of_types(
                self.cursor, EVENTS, limit=BATCH, with_url_only=not self.config.webhook_url
            )
            rows = []
            for event in events:
                rows += await self.rows_for(event, now)
            if rows:
                await self.store.enqueue_deliveries(CURSOR, up_to, rows)
                self.saved, self.saved_at = up_to, time.monotonic()
            self.cursor = up_to
            if caught_up:
                break
            await asyncio.sleep(0)  # a long backlog: let requests and steps in between pages
        await self.enqueue_ticks()
        # Events nobody watches still move the cursor, but not with a write per event.
        if self.cursor != self.saved and time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            await self.store.enqueue_deliveries(CURSOR, self.cursor, [])
            self.saved, self.saved_at = self.cursor, time.monotonic()

    async def enqueue_ticks(self) -> None:
        """Skipped and missed schedule ticks to the operator's URL (only: they belong to no
        workflow with a notify_url; without one they are only marked). A fired tick
        notifies through its run's schedule_fired event."""
        url = self.config.webhook_url
        while True:
            found = await self.store.ticks_to_notify(BATCH)
            if not found:
                return
            rows = [{"event_id": -int(r["id"]), "workflow_id": r["run_id"] or 0, "url": url,
                     "dest": OPERATOR, "body_json": orjson.dumps(tick_body(r)).decode()}
                    for r in found] if url else []  # fmt: skip
            await self.store.enqueue_tick_deliveries([int(r["id"]) for r in found], rows)
            if len(found) < BATCH:
                return

    async def rows_for(self, event: dict[str, Any], now: float) -> list[dict[str, Any]]:
        wf = await self.store.get_workflow(event["workflow_id"])
        urls = [] if wf is None else targets(self.config, wf)
        if wf is None or not urls:
            return []
        step, gate_links, creator_too = None, None, False
        if event["type"] == "gate_waiting":
            step = await self.store.get_step(event["step_id"])
            if step is None:
                return []
            state = flows.raw_state(orjson.loads(wf.flow_json or "{}"), step.path, step.state)
            if (self.config.public_url and step.awaiting == "ready"
                    and links.admits_links(state, wf.created_by, self.config)):  # fmt: skip
                gate_links = links.make_links(self.config, self.server_secret(), step.id, now,
                                              gate_expires_ms=step.expires_at)  # fmt: skip
                # A link is a decision: the creator's own notify_url gets one only if the
                # creator could decide this gate anyway (self-approval, approvers).
                creator_too = links.creator_may_decide(state, wf.created_by, self.config)
        out = []
        for url, operator in urls:
            body = build_body(event, wf, step, gate_links if operator or creator_too else None)
            out.append({"event_id": event["id"], "workflow_id": wf.id, "url": url,
                        "dest": OPERATOR if operator else destination(url),
                        "body_json": orjson.dumps(body).decode()})  # fmt: skip
        return out

    async def deliver(self) -> None:
        """Start the due deliveries the limits allow; they finish in the background."""
        busy = set(self.inflight)  # before the query: a send ending meanwhile still reads due
        full = [dest for dest, n in self.lanes.items() if n >= _cap(dest)]
        rows = await self.store.due_deliveries(
            per_dest=PER_DESTINATION, per_operator=OPERATOR_CONCURRENCY, busy=full,
            limit=len(busy) + OPERATOR_CONCURRENCY + CONCURRENCY,
        )  # fmt: skip
        chosen = []
        lanes = dict(self.lanes)
        others = self._others()
        for row in rows:
            dest = row["dest"]
            if row["id"] in busy or row["id"] in self.inflight:
                continue
            if lanes.get(dest, 0) >= _cap(dest):
                continue
            if dest != OPERATOR and others >= CONCURRENCY:
                continue  # the operator's deliveries come first in `rows` and still start
            lanes[dest] = lanes.get(dest, 0) + 1
            others += dest != OPERATOR
            chosen.append(row)
        # Of several daemons, the one whose claim takes a delivery sends it; a daemon that
        # dies while sending leaves it to be taken again after VISIBILITY_MS.
        claimed = set(await self.store.claim_deliveries([r["id"] for r in chosen],
                                                        visibility_ms=VISIBILITY_MS))  # fmt: skip
        for row in chosen:
            if row["id"] in claimed:
                self._start(row)

    def _others(self) -> int:
        """Deliveries in flight to workflows' own receivers."""
        return len(self.inflight) - self.lanes.get(OPERATOR, 0)

    def _start(self, row: Row) -> None:
        dest, delivery = row["dest"], row["id"]
        self.lanes[dest] = self.lanes.get(dest, 0) + 1

        def done(_: asyncio.Task[None]) -> None:
            self.inflight.pop(delivery, None)
            self.lanes[dest] -= 1
            if not self.lanes[dest]:
                del self.lanes[dest]

        task = asyncio.create_task(self.send(row))
        self.inflight[delivery] = task
        task.add_done_callback(done)

    async def send(self, row: Row) -> None:
        body, ts = row["body_json"].encode(), int(time.time())
        secret = self.config.webhook_secret.encode() or self.webhook_secret()
        event = orjson.loads(body)["event"]
        headers = {"Content-Type": "application/json", "X-Stepd-Event": event,
                   "X-Stepd-Delivery": str(row["id"]), "X-Stepd-Timestamp": str(ts),
                   "X-Stepd-Signature": sign(secret, ts, body)}  # fmt: skip
        if self.client is None:
            policy = egress.policy(self.config.http_allow, self.config.http_deny)
            self.client = egress.client(policy, timeout=TIMEOUT_S, follow_redirects=False)
        error, refused = None, False
        try:  # streamed and never read: a receiver cannot make us buffer a large answer
            async with self.client.stream("POST", row["url"], content=body, headers=headers) as r:
                if not 200 <= r.status_code < 300:
                    error = f"HTTP {r.status_code}"
        except egress.EgressDenied as exc:
            # The policy is fixed while the daemon runs: trying again would send nothing.
            error, refused = str(exc)[:500], True
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        attempts = row["attempts"] + 1
        dead = error is not None and (refused or attempts >= self.config.webhook_max_attempts)
        if error is not None:
            log.log(logging.ERROR if dead else logging.WARNING,
                    "webhook %d (%s) to %s failed, attempt %d%s: %s", row["id"], event,
                    row["url"], attempts, " (giving up)" if dead else "", error)  # fmt: skip
        next_at = now_ms() + int(retry_delay(attempts, _jitter.random()) * 1000)
        write = asyncio.ensure_future(
            self.store.delivery_done(row["id"], error=error, next_at=next_at, dead=dead)
        )
        try:  # shielded: a stop must not forget that the receiver already has it
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await write
            raise
        except Exception:
            log.exception("webhook %d: recording the attempt failed; it is sent again", row["id"])


def _cap(dest: str) -> int:
    return OPERATOR_CONCURRENCY if dest == OPERATOR else PER_DESTINATION


async def run(store: BaseStore, config: Config) -> None:
    """Tail the event log into the outbox and deliver it, until cancelled; never dies."""
    await Notifier(store, config).run()
