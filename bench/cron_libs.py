"""cronsim (what daemon/cron.py is built on) against croniter: speed and daylight saving.

    python bench/cron_libs.py [--calls 5000]

It reads its tables from tests/test_cron.py (so it needs the `test` extra). croniter is not
a dependency of stepd: install it in a bench venv (`pip install croniter`); without it only
cronsim and daemon/cron.py are measured.

(a) Next fire time: median microseconds of one call "the first fire time after t", over
    --calls instants spread over a year (the same instants for every library), for three
    expressions in UTC and in America/New_York. A call builds the iterator from t and takes
    one value, as a scheduler does after each tick: `next(CronSim(expr, t))`,
    `croniter(expr, t).get_next(datetime)`, and `cron.parse(expr, zone).next_after(t)`
    (parsed once; the wrapper's own work: strictly-after, real-time wildcard schedules).
(b) Daylight saving: the tables of tests/test_cron.py (offset changes found in the zone
    database, 8 zones x 2025, 2026, 2027, 2030), each library's fire times over the change:
      skipped   a fixed time in the skipped hour (02:30 on spring-forward day) fires once
                that day, at the first valid time after (03:00 new offset)
      repeated  a fixed time in the repeated hour (01:30 on fall-back day) fires once that
                day, at the first occurrence
      15 min    `*/15 * * * *` over the change (+-6 h) fires every 15 real minutes
      hourly    `0 * * * *` over the change (+-6 h) fires at every real minute 0, once
      wildcard  `30 * * * *`, `*/15 2 * * *`, `5 */2 * * *` over the change (+-26 h) fire at
                every real minute whose wall clock matches (Debian cron's wildcard jobs)
    a case counts as right when the fire times (as instants) equal the reference's.
Then each library's version and, where pip can fetch its wheel, the wheel's file date.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zoneinfo
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cronsim import CronSim  # noqa: E402

from daemon import cron  # noqa: E402
from tests.test_cron import (  # noqa: E402 - the same tables as the tests
    DST_ZONES,
    MINUTE,
    YEARS,
    exists,
    expected_fires,
    fall_back,
    spring_forward,
    transitions,
)

try:
    from croniter import croniter
except ImportError:  # not a dependency of stepd
    croniter = None

EXPRESSIONS = ["*/15 * * * *", "0 9 * * 1-5", "30 2 1 * *"]
# Real-time schedules whose fire times an offset change off the hour moves (Lord Howe, Chatham).
WILDCARD_MORE = ["30 * * * *", "*/15 2 * * *", "5 */2 * * *"]
ZONES = ["UTC", "America/New_York"]


def next_cronsim(expr: str, t: datetime) -> datetime:
    return next(CronSim(expr, t))


def next_croniter(expr: str, t: datetime) -> datetime:
    return croniter(expr, t).get_next(datetime)


LIBS = {"cronsim": next_cronsim}
if croniter is not None:
    LIBS["croniter"] = next_croniter


def speed(calls: int) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for zone in ZONES:
        tz = zoneinfo.ZoneInfo(zone)
        base = datetime(2026, 1, 1, tzinfo=UTC)
        step = timedelta(days=365) / calls
        instants = [(base + step * i).replace(microsecond=0).astimezone(tz) for i in range(calls)]
        for expr in EXPRESSIONS:
            medians = {}
            wrapper = cron.parse(expr, zone)
            funcs = dict(LIBS)
            funcs["daemon/cron.py"] = lambda _e, t, w=wrapper: w.next_after(t)
            samples: dict[str, list[int]] = {name: [] for name in funcs}
            clock = time.perf_counter_ns
            for t in instants:  # interleaved: a shared machine's noise falls on all alike
                for name, func in funcs.items():
                    t0 = clock()
                    func(expr, t)
                    samples[name].append(clock() - t0)
            for name in funcs:
                medians[name] = statistics.median(samples[name]) / 1000
            rows.append((expr, zone, medians))
    return rows


def lib_fires(lib: str, expr: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    """The library's fire times after `start` up to `end`, as UTC instants."""
    tz = zoneinfo.ZoneInfo(zone)
    out: list[datetime] = []
    if lib == "daemon/cron.py":
        for fire in cron.parse(expr, zone).after(start):
            if fire.astimezone(UTC) > end:
                break
            out.append(fire.astimezone(UTC))
        return out
    if lib == "cronsim":
        it = CronSim(expr, start.astimezone(tz))
        get = it.__next__
    else:
        it = croniter(expr, start.astimezone(tz))
        get = lambda: it.get_next(datetime)  # noqa: E731
    for _ in range(5000):
        try:
            fire = get().astimezone(UTC)
        except StopIteration:
            break
        if fire > end:
            break
        out.append(fire)
    return out


def day_bounds(zone: str, day) -> tuple[datetime, datetime]:
    tz = zoneinfo.ZoneInfo(zone)
    first = datetime.combine(day, datetime.min.time())
    while not exists(first, tz):
        first += MINUTE
    last = datetime.combine(day + timedelta(days=1), datetime.min.time())
    while not exists(last, tz):
        last += MINUTE
    first_utc = first.replace(tzinfo=tz).astimezone(UTC)
    return first_utc - timedelta(seconds=1), last.replace(tzinfo=tz).astimezone(UTC) - MINUTE


def dst_cases():
    """(table, zone, expression, start, end, expected UTC instants)."""
    for zone in DST_ZONES:
        tz = zoneinfo.ZoneInfo(zone)
        for year in YEARS:
            instant, shift = spring_forward(zone, year)
            gap = (instant - MINUTE).astimezone(tz).replace(tzinfo=None) + MINUTE + shift / 2
            start, end = day_bounds(zone, gap.date())
            yield "skipped", zone, f"{gap.minute} {gap.hour} * * *", start, end, [instant]
            instant, shift = fall_back(zone, year)
            middle = (instant - shift / 2).astimezone(tz)
            start, end = day_bounds(zone, middle.date())
            expected = [middle.astimezone(UTC)]
            yield "repeated", zone, f"{middle.minute} {middle.hour} * * *", start, end, expected
            for change, _, _ in transitions(zone, year):
                start, end = change - timedelta(hours=6), change + timedelta(hours=6)
                for table, expr in (("15 min", "*/15 * * * *"), ("hourly", "0 * * * *")):
                    yield table, zone, expr, start, end, expected_fires(expr, zone, start, end)
                start, end = change - timedelta(hours=26), change + timedelta(hours=26)
                for expr in WILDCARD_MORE:
                    yield "wildcard", zone, expr, start, end, expected_fires(expr, zone, start, end)


def correctness(libs: list[str]) -> tuple[dict, list[str]]:
    score: dict[tuple[str, str], list[int]] = {}
    wrong: list[str] = []
    shown: dict[tuple[str, str], int] = {}
    for table, zone, expr, start, end, expected in dst_cases():
        for lib in libs:
            right, total = score.setdefault((table, lib), [0, 0])
            try:
                got = lib_fires(lib, expr, zone, start, end)
            except Exception as exc:  # noqa: BLE001 - a library's failure counts as wrong
                got = [f"error: {exc}"]
            ok = got == expected
            score[(table, lib)] = [right + ok, total + 1]
            if not ok and shown.get((lib, table), 0) < 2:  # two of each kind
                shown[(lib, table)] = shown.get((lib, table), 0) + 1
                tz = zoneinfo.ZoneInfo(zone)
                extra = [g if isinstance(g, str) else cron.iso(g.astimezone(tz)) for g in got]
                extra = [g for g, raw in zip(extra, got, strict=True) if raw not in expected]
                lost = [cron.iso(e.astimezone(tz)) for e in expected if e not in got]
                wrong.append(f"  {lib} {table} {zone} {expr!r}: extra {extra}, missing {lost}")
    return score, wrong


def release(package: str) -> str:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
                 ":all:", f"{package}=={version}", "-d", tmp],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as z:
                stamp = max(i.date_time for i in z.infolist())
            dated = f", wheel files dated {datetime(*stamp):%Y-%m-%d}"
        except Exception:  # noqa: BLE001 - offline or no wheel: the version alone
            dated = ", no date (pip could not fetch the wheel)"
    latest = ""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", package],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        latest = next(
            (f", latest {line.split(':', 1)[1].strip()}" for line in out.splitlines()
             if line.strip().startswith("LATEST:")),
            "",
        )  # fmt: skip
    except Exception:  # noqa: BLE001
        pass
    return f"{version} installed{latest}{dated}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5_000)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # croniter's deprecation notices
    began = time.monotonic()
    libs = [*LIBS, "daemon/cron.py"]

    print(f"(a) next fire time, median us over {args.calls} calls (instants spread over 2026)")
    rows = speed(args.calls)
    print(f"{'expression':<16} {'zone':<18}" + "".join(f"{lib:>16}" for lib in libs))
    for expr, zone, medians in rows:
        print(f"{expr:<16} {zone:<18}" + "".join(f"{medians[lib]:>16.1f}" for lib in libs))

    print("\n(b) daylight saving: cases right (fire times equal the reference's)")
    print(f"    zones: {', '.join(DST_ZONES)}; years {', '.join(map(str, YEARS))}")
    score, wrong = correctness(libs)
    print(f"{'table':<10}" + "".join(f"{lib:>16}" for lib in libs))
    totals = dict.fromkeys(libs, (0, 0))
    for table in ("skipped", "repeated", "15 min", "hourly", "wildcard"):
        cells = []
        for lib in libs:
            right, total = score[(table, lib)]
            totals[lib] = (totals[lib][0] + right, totals[lib][1] + total)
            cells.append(f"{right}/{total}")
        print(f"{table:<10}" + "".join(f"{c:>16}" for c in cells))
    print(f"{'all':<10}" + "".join(f"{f'{r}/{t}':>16}" for r, t in totals.values()))
    if wrong:
        print("wrong cases (two of each kind):")
        print("\n".join(wrong))

    print("\nreleases:")
    for package in ("cronsim", "croniter"):
        print(f"  {package}: {release(package)}")
    print(f"\n({time.monotonic() - began:.1f} s)")


if __name__ == "__main__":
    main()
