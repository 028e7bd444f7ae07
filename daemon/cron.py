"""Cron expressions in IANA time zones: parsing, fire times and descriptions (cronsim).

Fire times follow Debian cron around daylight saving changes, which cronsim implements:
a schedule at a fixed local time (minute and hour both given) that falls in a skipped
hour (spring forward) fires once, at the first valid minute after it; in a repeated hour
(fall back) it fires once, at the first of the two. A schedule with a wildcard minute or
hour (every 15 minutes, hourly) follows real time, so it neither bunches nor stops: it
fires at every instant whose local wall clock matches. cronsim walks such a schedule in
whole hours, which skips real fire times where an offset change is not on an hour of
the wall clock (Australia/Lord_Howe's 30-minute change, Pacific/Chatham's +12:45), so
here it runs in the fixed UTC offset of each stretch between two changes instead.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import timezone as fixed_offset

from cronsim import CronSim, CronSimError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_EXPRESSION = 200  # characters
# In the database's directory but not zones: "localtime" is the host's own zone (a link to
# /etc/localtime), "posixrules" a template.
NOT_ZONES = frozenset({"localtime", "posixrules"})
# An expression that fires very rarely makes every look-ahead walk years of calendar (and,
# following real time in a zone with daylight saving, walk them again from each offset
# change): a schedule's next five fire times must fall within this many days...
MAX_SPAN_DAYS = 30 * 366
# ...and finding them in real time may restart the walk at this many offset changes.
MAX_RESTARTS = 16


class CronError(ValueError):
    """An expression or time zone that cannot be used; the message says why."""


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - NOT_ZONES


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name` (only names of the database: never a file path)."""
    if not isinstance(name, str) or name not in _zone_names() and name != "UTC":
        text = str(name)
        shown = repr(text if len(text) <= 60 else text[:60] + "...")
        raise CronError(f"unknown time zone {shown} (an IANA name such as 'Europe/Paris')")
    return zoneinfo.ZoneInfo(name)


@dataclass(frozen=True)
class Cron:
    expression: str  # as given (a macro stays a macro)
    timezone: str
    fields: str  # the five fields cronsim iterates
    tz: zoneinfo.ZoneInfo

    @property
    def real_time(self) -> bool:
        """A wildcard minute or hour: fires follow real time (Debian cron, and cronsim)."""
        parts = self.fields.split()
        if len(parts) == 6:  # seconds first: not Debian cron, real time always (cronsim too)
            return True
        minute, hour = parts[:2]
        return minute.startswith("*") or hour.startswith("*")

    def after(self, instant: datetime) -> Iterator[datetime]:
        """Fire times strictly after `instant` (aware), in the schedule's zone, ascending."""
        if self.real_time and self.tz.key != "UTC":
            yield from self._after_real_time(instant)
            return
        start = instant.astimezone(self.tz)
        last = start
        # cronsim starts at whole seconds and returns times >= its start + 1 s; a time not
        # after `instant` (from the wall-clock walk around a repeated hour) is passed over.
        for fire in CronSim(self.fields, start.replace(microsecond=0)):
            if fire.astimezone(UTC) <= last.astimezone(UTC):
                continue
            last = fire
            yield fire

    def _after_real_time(
        self, instant: datetime, restarts: int | None = None
    ) -> Iterator[datetime]:
        """cronsim in the fixed offset in force after `t`, up to the next offset change,
        then again from that change in the new offset (at most `restarts` times: then
        CronError)."""
        t = since = instant.astimezone(UTC)  # fires after t; offset changes after since
        while True:
            offset = (t + timedelta(microseconds=1)).astimezone(self.tz).utcoffset()
            start = t.astimezone(fixed_offset(offset)).replace(microsecond=0)
            for fire in CronSim(self.fields, start):  # times >= start + 1 s, so after t
                change = _first_change(self.tz, since, fire.astimezone(UTC))
                if change is not None:  # `fire` is read in an offset no longer in force
                    if restarts is not None:
                        restarts -= 1
                        if restarts < 0:
                            raise CronError("too many offset changes")
                    t, since = change - timedelta(microseconds=1), change
                    break
                t = since = fire.astimezone(UTC)
                yield fire.astimezone(self.tz)
            else:
                return

    def next_after(self, instant: datetime) -> datetime | None:
        """The first fire time after `instant`, or None if there is none (Feb 30)."""
        return next(self.after(instant), None)

    def next_ms(self, after_ms: int) -> int | None:
        """The first fire time after epoch milliseconds `after_ms`, as epoch milliseconds."""
        fire = self.next_after(datetime.fromtimestamp(after_ms / 1000, UTC))
        return None if fire is None else to_ms(fire)

    def between(self, start: datetime, end: datetime, limit: int) -> list[datetime]:
        """Fire times t with start <= t <= end, at most `limit` + 1 of them (so a caller
        can tell the window holds more than `limit`)."""
        out: list[datetime] = []
        # In UTC: arithmetic and comparisons on two datetimes of one ZoneInfo go by the wall
        # clock (an hour too late in a skipped hour, 01:30 EDT == 01:30 EST in a repeated one).
        end = end.astimezone(UTC)
        for fire in self.after(start.astimezone(UTC) - timedelta(microseconds=1)):
            if fire.astimezone(UTC) > end or len(out) > limit:
                break
            out.append(fire)
        return out

    def upcoming(self, after: datetime, count: int = 5) -> list[datetime]:
        out: list[datetime] = []
        for fire in self.after(after):
            out.append(fire)
            if len(out) == count:
                break
        return out

    def describe(self) -> str:
        """In words, e.g. "At 09:00 on Monday through Friday"."""
        return _describe(self.fields)


@functools.lru_cache(maxsize=4096)
def _describe(fields: str) -> str:
    try:
        return CronSim(fields, datetime.now(UTC)).explain()
    except Exception:  # noqa: BLE001 - a description is a nicety, never an error
        return fields


def parse(expression: str, timezone: str = "UTC") -> Cron:
    """A cron expression (five fields; six with seconds first; or @hourly, @daily,
    @weekly, @monthly, @yearly) in an IANA time zone. Raises CronError saying what is
    wrong. (Six-field expressions follow real time around daylight saving changes.)"""
    if not isinstance(expression, str) or not isinstance(timezone, str):
        raise CronError("cron_expression and timezone must be strings")
    return _parse(expression, timezone)


@functools.lru_cache(maxsize=4096)
def _parse(expression: str, timezone: str) -> Cron:
    if not expression.strip():
        raise CronError("cron_expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION:
        raise CronError(f"cron_expression must be at most {MAX_EXPRESSION} characters")
    tz = zone(timezone)
    text = " ".join(expression.split())
    fields = MACROS.get(text.lower(), text)
    if fields.startswith("@"):
        raise CronError(f"unknown cron macro {text!r} (known: {', '.join(sorted(MACROS))})")
    if len(fields.split()) not in (5, 6):
        raise CronError(
            "cron_expression must have five fields (minute hour day-of-month month "
            f"day-of-week), or six with seconds first; got {len(fields.split())}"
        )
    try:
        probe = CronSim(fields, datetime.now(tz))
        next(probe)
    except CronSimError as exc:
        raise CronError(f"invalid cron_expression {text!r}: {exc}") from None
    except StopIteration:
        raise CronError(f"cron_expression {text!r} never fires") from None
    return Cron(expression=text, timezone=timezone, fields=fields, tz=tz)


def check_cost(c: Cron) -> None:
    """Refuse (CronError) an expression whose next five fire times take long to find: each
    read of a schedule shows them, on the event loop. One cronsim walk in UTC (cheap) must
    find them within MAX_SPAN_DAYS, and a real-time walk in a zone with offset changes
    must find them within MAX_RESTARTS restarts. For a schedule being saved only: the
    answer depends on the time it is asked, so a stored schedule is never parsed with it."""
    text = c.expression
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        five = list(itertools.islice(CronSim(c.fields, now), 5))
    except CronSimError as exc:
        raise CronError(f"invalid cron_expression {text!r}: {exc}") from None
    if len(five) < 5 or five[-1] - now > timedelta(days=MAX_SPAN_DAYS):
        raise CronError(
            f"cron_expression {text!r} fires too rarely: its next five fire times must "
            f"fall within {MAX_SPAN_DAYS // 366} years"
        )
    if c.real_time and c.tz.key != "UTC":
        try:
            for _ in itertools.islice(c._after_real_time(now, MAX_RESTARTS), 5):
                pass
        except CronError:
            raise CronError(
                f"cron_expression {text!r} fires too rarely to follow the offset changes of "
                f"{c.timezone} (seconds or a wildcard minute or hour follow real time); "
                "give the minute and hour, or fewer fields"
            ) from None


@functools.cache
def _changes(key: str, year: int) -> tuple[datetime, ...]:
    """The instants (UTC, to the second) where zone `key`'s UTC offset changes, found by
    reading the offset every 6 hours of `year` and bisecting where it differs."""
    tz = zoneinfo.ZoneInfo(key)
    out = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    before = t.astimezone(tz).utcoffset()
    while t < end:
        nxt = t + timedelta(hours=6)
        after = nxt.astimezone(tz).utcoffset()
        if after != before:
            lo, hi = t, nxt
            while hi - lo > timedelta(seconds=1):
                mid = (lo + (hi - lo) / 2).replace(microsecond=0)
                if mid.astimezone(tz).utcoffset() == before:
                    lo = mid
                else:
                    hi = mid
            out.append(hi)
            before = after
        t = nxt
    return tuple(out)


def _first_change(tz: zoneinfo.ZoneInfo, after: datetime, until: datetime) -> datetime | None:
    """The first offset change c with after < c <= until (UTC instants), or None."""
    for year in range(after.year - 1, until.year + 1):
        changes = _changes(tz.key, year)
        i = bisect.bisect_right(changes, after)
        if i < len(changes) and changes[i] <= until:
            return changes[i]
    return None


def to_ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)


def from_ms(ms: int, tz: zoneinfo.ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)


def iso(instant: datetime) -> str:
    """ISO 8601 with the UTC offset, to the second: 2026-03-08T03:00:00-04:00."""
    return instant.isoformat(timespec="seconds")
