"""Cron fire times in IANA time zones (daemon/cron.py), around daylight saving changes.

Every instant is given to the code under test (no clock, no sleeping). Transition days
are found in the zone database itself, and fire times are checked against a brute-force
reference (`expected_fires`): a schedule with a wildcard minute or hour fires at every
real minute whose local wall clock matches; a schedule at fixed local times fires once
per matching local time, at its first occurrence in a repeated hour, and at the first
valid minute after it in a skipped one (Debian cron). A few strings are written out in
full, so a wrong zone database or a wrong reading of it fails too.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import cron

DST_ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Sydney",  # southern hemisphere: forward in October, back in April
    "America/Santiago",  # changes at local midnight
    "Pacific/Auckland",
    "Australia/Lord_Howe",  # a 30-minute change
    "Pacific/Chatham",  # +12:45 / +13:45
]
YEARS = [2025, 2026, 2027, 2030]
MINUTE = timedelta(minutes=1)


# -- reference ------------------------------------------------------------------------


@functools.cache
def transitions(name: str, year: int) -> tuple[tuple[datetime, timedelta, timedelta], ...]:
    """(instant, offset before, offset after) of each UTC offset change in `year`."""
    tz = zoneinfo.ZoneInfo(name)
    out = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    before = t.astimezone(tz).utcoffset()
    while t < end:
        nxt = t + timedelta(hours=6)
        after = nxt.astimezone(tz).utcoffset()
        if after != before:
            lo, hi = t, nxt  # offset(lo) == before, offset(hi) == after
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) // 2
                mid = mid.replace(microsecond=0)
                if mid.astimezone(tz).utcoffset() == before:
                    lo = mid
                else:
                    hi = mid
            out.append((hi, before, after))
            before = after
        t = nxt
    return tuple(out)


def spring_forward(name: str, year: int) -> tuple[datetime, timedelta]:
    (hit,) = [(t, b - a) for t, a, b in transitions(name, year) if b > a]
    return hit


def fall_back(name: str, year: int) -> tuple[datetime, timedelta]:
    (hit,) = [(t, a - b) for t, a, b in transitions(name, year) if b < a]
    return hit


def _values(spec: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/")
            step = int(step_text)
        if part == "*":
            first, last = lo, hi
        elif "-" in part:
            first, last = map(int, part.split("-"))
        else:
            first = last = int(part)
            if step != 1:
                last = hi
        out.update(range(first, last + 1, step))
    return out


class Fields:
    """The five fields of a plain expression (numbers, lists, ranges, steps)."""

    def __init__(self, expression: str):
        minute, hour, dom, month, dow = expression.split()
        self.wildcard = minute.startswith("*") or hour.startswith("*")
        self.minutes = _values(minute, 0, 59)
        self.hours = _values(hour, 0, 23)
        self.doms = _values(dom, 1, 31)
        self.months = _values(month, 1, 12)
        self.dows = {d % 7 for d in _values(dow, 0, 7)}
        # Debian cron: day-of-month OR day-of-week when both are restricted.
        self.day_and = dom.startswith("*") or dow.startswith("*")

    def day(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        by_dom = d.day in self.doms
        by_dow = d.isoweekday() % 7 in self.dows
        return by_dom and by_dow if self.day_and else by_dom or by_dow

    def wall(self, local: datetime) -> bool:
        return (
            local.second == 0
            and local.minute in self.minutes
            and local.hour in self.hours
            and self.day(local.date())
        )


def exists(naive: datetime, tz: zoneinfo.ZoneInfo) -> bool:
    return naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive


def expected_fires(expression: str, name: str, start: datetime, end: datetime) -> list[datetime]:
    """Fire instants t (UTC) with start < t <= end, by brute force."""
    tz = zoneinfo.ZoneInfo(name)
    fields = Fields(expression)
    out: set[datetime] = set()
    if fields.wildcard:  # every real minute whose wall clock matches
        t = start.astimezone(UTC).replace(second=0, microsecond=0)
        while t <= end:
            if t > start and fields.wall(t.astimezone(tz)):
                out.add(t)
            t += MINUTE
        return sorted(out)
    d = start.astimezone(tz).date() - timedelta(days=1)
    while d <= end.astimezone(tz).date() + timedelta(days=1):
        if fields.day(d):
            for h in fields.hours:
                for m in fields.minutes:
                    naive = datetime.combine(d, time(h, m))
                    while not exists(naive, tz):  # skipped: the first valid minute after
                        naive += MINUTE
                    t = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)  # first occurrence
                    if start < t <= end:
                        out.add(t)
        d += timedelta(days=1)
    return sorted(out)


def fires(expression: str, name: str, start: datetime, end: datetime) -> list[datetime]:
    out = []
    for fire in cron.parse(expression, name).after(start):
        if fire > end:
            break
        out.append(fire)
    return out


def utc(instants: list[datetime]) -> list[datetime]:
    """In UTC: aware datetimes of one ZoneInfo subtract by wall clock, not real time."""
    return [i.astimezone(UTC) for i in instants]


def local_day(name: str, d: date) -> tuple[datetime, datetime]:
    """The first and last instant of local date d (a day may start at 01:00)."""
    tz = zoneinfo.ZoneInfo(name)
    first = datetime.combine(d, time())
    while not exists(first, tz):
        first += MINUTE
    last = datetime.combine(d + timedelta(days=1), time())
    while not exists(last, tz):
        last += MINUTE
    last = last.replace(tzinfo=tz).astimezone(UTC) - timedelta(microseconds=1)
    return first.replace(tzinfo=tz), last


def on_local_date(name: str, expression: str, d: date) -> list[datetime]:
    first, last = local_day(name, d)
    return cron.parse(expression, name).between(first, last, 100)


ZONE_YEARS = [(z, y) for z in DST_ZONES for y in YEARS]


# -- the zone database, as these tests read it -----------------------------------------


@pytest.mark.parametrize(("name", "year"), ZONE_YEARS)
def test_two_transitions_a_year(name, year):
    found = transitions(name, year)
    assert len(found) == 2
    shift = 30 if name == "Australia/Lord_Howe" else 60
    assert {abs(b - a) for _, a, b in found} == {timedelta(minutes=shift)}


@pytest.mark.parametrize("year", YEARS)
def test_kolkata_has_no_transitions(year):
    assert transitions("Asia/Kolkata", year) == ()
    # Half-hour offset, every day alike.
    assert [cron.iso(f) for f in fires("30 2 * * *", "Asia/Kolkata", *local_day_pair(year))] == [
        f"{year}-03-{d:02d}T02:30:00+05:30" for d in range(1, 11)
    ]
    hourly = utc(fires("0 * * * *", "Asia/Kolkata", *local_day_pair(year)))
    assert all(b - a == timedelta(hours=1) for a, b in zip(hourly, hourly[1:], strict=False))
    assert {cron.iso(f.astimezone(zoneinfo.ZoneInfo("Asia/Kolkata")))[-6:] for f in hourly} == {
        "+05:30"
    }


def local_day_pair(year: int) -> tuple[datetime, datetime]:
    tz = zoneinfo.ZoneInfo("Asia/Kolkata")
    return datetime(year, 3, 1, tzinfo=tz), datetime(year, 3, 10, 23, 59, tzinfo=tz)


# -- a fixed time in a skipped hour, in a repeated hour --------------------------------


@pytest.mark.parametrize(("name", "year"), ZONE_YEARS)
def test_fixed_time_in_skipped_hour_fires_once_at_the_next_valid_time(name, year):
    tz = zoneinfo.ZoneInfo(name)
    instant, shift = spring_forward(name, year)
    gap_start = (instant - MINUTE).astimezone(tz) + MINUTE  # wall clock, old offset: 02:00
    assert not exists(gap_start.replace(tzinfo=None), tz)
    in_gap = gap_start.replace(tzinfo=None) + shift / 2  # 02:30 (02:15 on Lord Howe)
    expression = f"{in_gap.minute} {in_gap.hour} * * *"
    got = on_local_date(name, expression, in_gap.date())
    assert utc(got) == [instant]  # once, at the end of the gap (03:00 new offset)
    assert got[0].astimezone(tz).replace(tzinfo=None) == gap_start.replace(tzinfo=None) + shift
    # The days around it fire at the given time.
    for d in (in_gap.date() - timedelta(days=1), in_gap.date() + timedelta(days=1)):
        (fire,) = on_local_date(name, expression, d)
        assert (fire.hour, fire.minute) == (in_gap.hour, in_gap.minute)


@pytest.mark.parametrize(("name", "year"), ZONE_YEARS)
def test_fixed_time_in_repeated_hour_fires_once_at_the_first_occurrence(name, year):
    tz = zoneinfo.ZoneInfo(name)
    instant, shift = fall_back(name, year)
    repeat_end = (instant - MINUTE).astimezone(tz) + MINUTE  # 02:00 old offset
    middle = (instant - shift / 2).astimezone(tz)  # 01:30, first occurrence
    twice = middle.replace(tzinfo=None)
    assert middle.fold == 0
    assert twice.replace(tzinfo=tz, fold=1).utcoffset() != twice.replace(tzinfo=tz).utcoffset()
    expression = f"{middle.minute} {middle.hour} * * *"
    got = on_local_date(name, expression, middle.date())
    assert [cron.iso(g) for g in got] == [cron.iso(middle)]
    assert got[0].utcoffset() == (instant - MINUTE).astimezone(tz).utcoffset()  # old offset
    assert repeat_end.replace(tzinfo=None) - twice == shift / 2


# Written out, from published rules (US: 2nd Sunday in March, 1st in November; EU: last
# Sundays of March and October at 01:00 UTC; New South Wales: 1st Sunday in October,
# 1st in April; Lord Howe: the same days, 30 minutes).
WRITTEN_OUT = [
    ("America/New_York", "30 2 * * *", "2026-03-08T00:00:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("America/New_York", "30 1 * * *", "2026-11-01T00:00:00-04:00", "2026-11-01T01:30:00-04:00"),
    ("America/New_York", "30 2 * * *", "2025-03-09T00:00:00-05:00", "2025-03-09T03:00:00-04:00"),
    ("America/New_York", "30 1 * * *", "2030-11-03T00:00:00-04:00", "2030-11-03T01:30:00-04:00"),
    ("Europe/London", "30 1 * * *", "2026-03-29T00:00:00+00:00", "2026-03-29T02:00:00+01:00"),
    ("Europe/London", "30 1 * * *", "2026-10-25T00:00:00+01:00", "2026-10-25T01:30:00+01:00"),
    ("Europe/Berlin", "30 2 * * *", "2027-03-28T00:00:00+01:00", "2027-03-28T03:00:00+02:00"),
    ("Europe/Berlin", "30 2 * * *", "2027-10-31T00:00:00+02:00", "2027-10-31T02:30:00+02:00"),
    ("Australia/Sydney", "30 2 * * *", "2026-10-04T00:00:00+10:00", "2026-10-04T03:00:00+11:00"),
    ("Australia/Sydney", "30 2 * * *", "2026-04-05T00:00:00+11:00", "2026-04-05T02:30:00+11:00"),
    ("Australia/Lord_Howe", "15 2 * * *", "2026-10-04T00:00:00+10:30", "2026-10-04T02:30:00+11:00"),
    ("Australia/Lord_Howe", "45 1 * * *", "2026-04-05T00:00:00+11:00", "2026-04-05T01:45:00+11:00"),
    ("Pacific/Auckland", "30 2 * * *", "2026-09-27T00:00:00+12:00", "2026-09-27T03:00:00+13:00"),
    ("America/Santiago", "30 0 * * *", "2026-09-05T12:00:00-04:00", "2026-09-06T01:00:00-03:00"),
    ("America/Santiago", "30 23 * * *", "2026-04-04T12:00:00-03:00", "2026-04-04T23:30:00-03:00"),
    ("Asia/Kolkata", "30 2 * * *", "2026-03-08T00:00:00+05:30", "2026-03-08T02:30:00+05:30"),
]


@pytest.mark.parametrize(("name", "expression", "start", "first"), WRITTEN_OUT)
def test_written_out(name, expression, start, first):
    got = cron.parse(expression, name).upcoming(datetime.fromisoformat(start), 2)
    assert cron.iso(got[0]) == first
    assert got[1].astimezone(UTC) - got[0].astimezone(UTC) > timedelta(
        hours=22
    )  # and not again the same night


# -- schedules that follow real time ----------------------------------------------------


@pytest.mark.parametrize(("name", "year"), ZONE_YEARS)
def test_every_15_minutes_is_evenly_spaced_in_real_time(name, year):
    for instant, _, _ in transitions(name, year):
        start, end = instant - timedelta(hours=6), instant + timedelta(hours=6)
        got = utc(fires("*/15 * * * *", name, start, end))
        assert len(got) == 48
        assert {b - a for a, b in zip(got, got[1:], strict=False)} == {timedelta(minutes=15)}
        assert got == expected_fires("*/15 * * * *", name, start, end)


@pytest.mark.parametrize(("name", "year"), ZONE_YEARS)
def test_hourly_neither_duplicates_nor_drops(name, year):
    for instant, before, after in transitions(name, year):
        start, end = instant - timedelta(hours=6), instant + timedelta(hours=6)
        got = fires("0 * * * *", name, start, end)
        assert len(set(utc(got))) == len(got)  # (one zone's 01:00 EDT == 01:00 EST)
        assert all(g.minute == 0 for g in got)
        assert utc(got) == expected_fires("0 * * * *", name, start, end)
        gaps = {b - a for a, b in zip(utc(got), utc(got[1:]), strict=False)}
        if abs(after - before) == timedelta(hours=1):
            assert gaps == {timedelta(hours=1)}  # every real hour, once
        else:  # Lord Howe: 01:00 +10:30 then 03:00 +11:00 (02:00 is not a time that day)
            assert gaps <= {timedelta(hours=1), timedelta(minutes=90), timedelta(minutes=30)}


AROUND_TRANSITIONS = [
    "30 2 * * *",
    "30 1 * * *",
    "0 0 * * *",
    "30 23 * * *",
    "45 0 * * *",
    "0,30 1-3 * * *",
    "15,45 2 * * *",
    "5 */2 * * *",
    "30 * * * *",
    "*/7 * * * *",
    "*/15 2 * * *",
    "*/20 0-3 * * *",
    "0 2 * * 0",
]


@pytest.mark.parametrize(("name", "year"), ZONE_YEARS)
@pytest.mark.parametrize("expression", AROUND_TRANSITIONS)
def test_matches_the_reference_around_transitions(name, year, expression):
    for instant, _, _ in transitions(name, year):
        start, end = instant - timedelta(hours=26), instant + timedelta(hours=26)
        got = fires(expression, name, start, end)
        assert [cron.iso(g) for g in got] == [
            cron.iso(t.astimezone(zoneinfo.ZoneInfo(name)))
            for t in expected_fires(expression, name, start, end)
        ]
        # Restarting from any fire time gives the rest of the same sequence.
        for a, b in zip(got, got[1:], strict=False):
            assert cron.iso(cron.parse(expression, name).next_after(a)) == cron.iso(b)


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone", "message"),
    [
        ("", "UTC", "non-empty"),
        ("   ", "UTC", "non-empty"),
        ("* * * *", "UTC", "five fields"),
        ("0 0 * * * * *", "UTC", "five fields"),
        ("0 0 1 1 * 2030", "UTC", "Bad day-of-week"),
        ("60 * * * *", "UTC", "invalid cron_expression"),
        ("0 24 * * *", "UTC", "invalid cron_expression"),
        ("0 0 32 * *", "UTC", "invalid cron_expression"),
        ("0 0 * 13 *", "UTC", "invalid cron_expression"),
        ("0 0 * * 8", "UTC", "invalid cron_expression"),
        ("*/0 * * * *", "UTC", "invalid cron_expression"),
        ("a b c d e", "UTC", "invalid cron_expression"),
        ("0 0 30 2 *", "UTC", "invalid cron_expression"),
        ("@reboot", "UTC", "unknown cron macro"),
        ("@every 5m", "UTC", "unknown cron macro"),
        ("0 " * 150, "UTC", "at most 200 characters"),
        ("0 9 * * *", "Mars/Olympus", "unknown time zone"),
        ("0 9 * * *", "../../etc/passwd", "unknown time zone"),
        ("0 9 * * *", "/usr/share/zoneinfo/UTC", "unknown time zone"),
        ("0 9 * * *", "localtime", "unknown time zone"),
        ("0 9 * * *", "america/new_york", "unknown time zone"),
        ("0 9 * * *", "", "unknown time zone"),
    ],
)
def test_parse_errors(expression, timezone, message):
    with pytest.raises(cron.CronError, match=message):
        cron.parse(expression, timezone)


def test_parse_error_messages_name_the_problem():
    with pytest.raises(cron.CronError) as err:
        cron.parse("* * * *")
    assert str(err.value) == (
        "cron_expression must have five fields (minute hour day-of-month month "
        "day-of-week), or six with seconds first; got 4"
    )
    with pytest.raises(cron.CronError) as err:
        cron.parse("0 9 * * *", "Europe/Pariss")
    assert "'Europe/Pariss'" in str(err.value) and "IANA" in str(err.value)
    with pytest.raises(cron.CronError) as err:
        cron.parse("@fortnightly")
    assert "@hourly" in str(err.value)  # says which macros exist


def test_parse_keeps_the_expression_and_zone():
    c = cron.parse("  0   9 * *   1-5 ", "America/New_York")
    assert (c.expression, c.fields, c.timezone) == (
        "0 9 * * 1-5",
        "0 9 * * 1-5",
        "America/New_York",
    )
    assert cron.parse("0 9 * * *").timezone == "UTC"


@pytest.mark.parametrize(
    ("macro", "fields"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macros(macro, fields):
    c = cron.parse(macro, "Europe/Berlin")
    assert c.expression == macro and c.fields == fields
    start = datetime(2026, 3, 1, tzinfo=UTC)
    same = cron.parse(fields, "Europe/Berlin").upcoming(start, 5)
    assert [cron.iso(f) for f in c.upcoming(start, 5)] == [cron.iso(f) for f in same]


def test_macro_values():
    tz = "America/New_York"
    start = datetime(2026, 12, 3, 18, 21, tzinfo=UTC)
    assert cron.iso(cron.parse("@yearly", tz).next_after(start)) == "2027-01-01T00:00:00-05:00"
    assert cron.iso(cron.parse("@monthly", tz).next_after(start)) == "2027-01-01T00:00:00-05:00"
    assert cron.iso(cron.parse("@weekly", tz).next_after(start)) == "2026-12-06T00:00:00-05:00"
    assert cron.iso(cron.parse("@daily", tz).next_after(start)) == "2026-12-04T00:00:00-05:00"
    assert cron.iso(cron.parse("@hourly", tz).next_after(start)) == "2026-12-03T14:00:00-05:00"


# -- between, upcoming, describe, conversions --------------------------------------------


def test_between_includes_both_ends():
    c = cron.parse("0 * * * *", "Europe/London")
    start = datetime(2026, 6, 1, 10, tzinfo=UTC)
    end = datetime(2026, 6, 1, 13, tzinfo=UTC)
    got = c.between(start, end, 100)
    assert [cron.iso(g) for g in got] == [
        "2026-06-01T11:00:00+01:00",
        "2026-06-01T12:00:00+01:00",
        "2026-06-01T13:00:00+01:00",
        "2026-06-01T14:00:00+01:00",
    ]
    # A microsecond inside the window on either side drops the end fire time.
    assert len(c.between(start + timedelta(microseconds=1), end, 100)) == 3
    assert len(c.between(start, end - timedelta(microseconds=1), 100)) == 3
    assert c.between(start + timedelta(minutes=1), start + timedelta(minutes=59), 100) == []


def test_between_stops_one_past_the_limit():
    c = cron.parse("* * * * *")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    got = c.between(start, start + timedelta(days=30), 1000)
    assert len(got) == 1001  # the caller can tell there are more than 1000
    assert got[0] == start and got[-1] == start + timedelta(minutes=1000)
    assert len(c.between(start, start + timedelta(minutes=999), 1000)) == 1000


def test_upcoming_five_with_offsets():
    c = cron.parse("0 9 * * 1-5", "America/New_York")
    got = c.upcoming(datetime(2026, 3, 5, 15, tzinfo=UTC), 5)
    assert [cron.iso(g) for g in got] == [
        "2026-03-06T09:00:00-05:00",
        "2026-03-09T09:00:00-04:00",  # across the change on Sunday 8 March
        "2026-03-10T09:00:00-04:00",
        "2026-03-11T09:00:00-04:00",
        "2026-03-12T09:00:00-04:00",
    ]
    assert c.upcoming(datetime(2026, 3, 5, 15, tzinfo=UTC), 1) == got[:1]
    assert [cron.iso(g) for g in cron.parse("0 12 * * *", "Asia/Kolkata").upcoming(got[0], 2)] == [
        "2026-03-07T12:00:00+05:30",  # 09:00 in New York is 19:30 in Kolkata
        "2026-03-08T12:00:00+05:30",
    ]


def test_after_is_strictly_after():
    c = cron.parse("0 9 * * *", "Europe/Berlin")
    nine = datetime(2026, 7, 1, 9, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
    assert c.next_after(nine) == nine + timedelta(days=1)
    assert c.next_after(nine - timedelta(microseconds=1)) == nine
    assert c.next_after(nine - timedelta(seconds=1)) == nine


def test_never_fires_and_far_future():
    # Feb 29 on a Monday (OR with day-of-week, so it fires on Mondays too) parses;
    # Feb 29 alone fires every leap year.
    c = cron.parse("0 0 29 2 *", "UTC")
    assert cron.iso(c.next_after(datetime(2026, 1, 1, tzinfo=UTC))) == "2028-02-29T00:00:00+00:00"


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("0 9 * * 1-5", ["09:00", "Monday", "Friday"]),
        ("*/15 * * * *", ["15"]),
        ("@daily", ["00:00"]),
        ("30 2 1 * *", ["02:30", "first day"]),
    ],
)
def test_describe(expression, words):
    text = cron.parse(expression, "America/New_York").describe()
    assert isinstance(text, str) and " " in text
    for w in words:
        assert w in text


def test_ms_conversions():
    tz = zoneinfo.ZoneInfo("Australia/Lord_Howe")
    c = cron.parse("15 2 * * *", "Australia/Lord_Howe")
    fire = c.next_after(datetime(2026, 10, 3, 12, tzinfo=tz))
    ms = cron.to_ms(fire)
    assert ms == int(datetime(2026, 10, 3, 15, 30, tzinfo=UTC).timestamp()) * 1000
    assert cron.from_ms(ms, tz) == fire and cron.iso(cron.from_ms(ms, tz)) == cron.iso(fire)
    assert c.next_ms(ms - 1) == ms and c.next_ms(ms) == cron.to_ms(c.next_after(fire))
    assert cron.to_ms(datetime(2026, 12, 3, 18, 0, 0, 123000, tzinfo=UTC)) % 1000 == 123


# -- property: any expression, zone and starting instant -------------------------------

PROPERTY_ZONES = ["UTC", "Asia/Kolkata", *DST_ZONES]


@st.composite
def field(draw, lo: int, hi: int, steps: list[int]):
    kind = draw(st.sampled_from(["*", "step", "one", "list", "range", "range_step"]))
    if kind == "*":
        return "*"
    if kind == "step":
        return f"*/{draw(st.sampled_from(steps))}"
    if kind == "one":
        return str(draw(st.integers(lo, hi)))
    if kind == "list":
        values = draw(st.sets(st.integers(lo, hi), min_size=2, max_size=4))
        return ",".join(map(str, sorted(values)))
    a = draw(st.integers(lo, hi))
    b = draw(st.integers(a, hi))
    if kind == "range":
        return f"{a}-{b}"
    return f"{a}-{b}/{draw(st.sampled_from(steps))}"


@st.composite
def expressions(draw):
    minute = draw(field(0, 59, [5, 7, 15, 20, 30]))
    hour = draw(field(0, 23, [2, 3, 6]))
    dom = draw(st.sampled_from(["*", "*", "*", "1", "15", "1,15", "10-20", "28"]))
    month = draw(st.sampled_from(["*", "*", "*", "3,4,9,10,11", "1-6", "10"]))
    dow = draw(st.sampled_from(["*", "*", "*", "1-5", "0", "6", "0,6"]))
    return f"{minute} {hour} {dom} {month} {dow}"


@st.composite
def instants(draw, name: str):
    """Often close to an offset change, else anywhere in 2025-2030."""
    year = draw(st.sampled_from(YEARS))
    near = transitions(name, year)
    if near and draw(st.booleans()):
        base = draw(st.sampled_from(near))[0]
        return base + timedelta(seconds=draw(st.integers(-2 * 86400, 2 * 86400)))
    return datetime(year, 1, 1, tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, 365 * 86400)))


def in_gap_shift(fields: Fields, fire: datetime, tz: zoneinfo.ZoneInfo) -> bool:
    """A fixed-time fire moved out of a skipped hour: a skipped wall time just before it matches."""
    naive = fire.astimezone(tz).replace(tzinfo=None)
    probe = naive - MINUTE
    shifted = False
    while not exists(probe, tz):
        if fields.wall(probe):
            shifted = True
        probe -= MINUTE
    return shifted and not fields.wildcard


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), expression=expressions(), name=st.sampled_from(PROPERTY_ZONES))
def test_fire_times_are_consistent(data, expression, name):
    tz = zoneinfo.ZoneInfo(name)
    start = data.draw(instants(name))
    c = cron.parse(expression, name)
    fields = Fields(expression)
    got = c.upcoming(start, 12)
    assert got, "every expression of this grammar fires"
    assert got[0].astimezone(UTC) > start.astimezone(UTC)
    assert all(a < b for a, b in zip(utc(got), utc(got[1:]), strict=False))  # increasing
    for fire in got:
        assert fire.tzinfo is tz or fire.utcoffset() == fire.astimezone(tz).utcoffset()
        assert cron.iso(fire) == cron.iso(fire.astimezone(UTC).astimezone(tz))  # a real label
        assert fields.wall(fire.astimezone(tz)) or in_gap_shift(fields, fire, tz), cron.iso(fire)
    # From any fire time, or any instant between two, the rest of the same sequence.
    for a, b in zip(got, got[1:], strict=False):
        assert cron.iso(c.next_after(a)) == cron.iso(b)
        a_utc, b_utc = a.astimezone(UTC), b.astimezone(UTC)  # not wall-clock arithmetic
        between = a_utc + (b_utc - a_utc) * data.draw(st.floats(0, 0.999))
        assert cron.iso(c.next_after(between)) == cron.iso(b)
    # Nothing missed, where the window is short enough to check minute by minute.
    if got[-1].astimezone(UTC) - start.astimezone(UTC) <= timedelta(days=3):
        assert utc(got) == expected_fires(expression, name, start, got[-1])


def test_six_fields_have_seconds_first_and_follow_real_time() -> None:
    c = cron.parse("*/20 * * * * *", "America/New_York")
    assert c.real_time
    after = datetime(2026, 11, 1, 5, 59, 30, tzinfo=UTC)  # 01:59:30 EDT, just before fall-back
    assert [cron.iso(t) for t in c.upcoming(after, 4)] == [
        "2026-11-01T01:59:40-04:00", "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:00:20-05:00", "2026-11-01T01:00:40-05:00",
    ]  # fmt: skip
