"""The suite's output: the printed table, the stepd/peer ratios and the PNG charts.

Kept apart from suite.py (which runs things) so a saved results.json can be re-rendered:

    python bench/report.py bench/results/results.json
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

# Throughput scenarios in display order: key -> label.
THROUGHPUT = {
    "stepd_http_full": "stepd HTTP, synchronous=FULL",
    "stepd_inproc_full": "stepd in-process, synchronous=FULL",
    "stepd_http_normal": "stepd HTTP, synchronous=NORMAL",
    "stepd_pg_1": "stepd HTTP, PostgreSQL, 1 daemon",
    "stepd_pg_2": "stepd HTTP, PostgreSQL, 2 daemons, one database",
    "stepd_pg_3": "stepd HTTP, PostgreSQL, 3 daemons, one database",
    "stepd_plain_full": "stepd HTTP, plain client (16 http.client threads)",
    "dbos": "DBOS {dbos} (SQLite system db)",
    "huey_default": "Huey {huey}, default polling",
    "huey_tuned": "Huey {huey}, tuned polling (-d 0.01 -m 0.01)",
}
SHORT = {
    "stepd_http_full": "stepd HTTP\nFULL",
    "stepd_inproc_full": "stepd in-proc\nFULL",
    "stepd_http_normal": "stepd HTTP\nNORMAL",
    "stepd_pg_1": "stepd PG\n1 daemon",
    "stepd_pg_2": "stepd PG\n2 daemons",
    "stepd_pg_3": "stepd PG\n3 daemons",
    "stepd_plain_full": "stepd plain\nclient",
    "dbos": "DBOS",
    "huey_default": "Huey\ndefault",
    "huey_tuned": "Huey\ntuned",
}
# Latency measures in display order: (system, measure) -> label.
LATENCY = {
    ("stepd", "create_to_start"): "stepd   create -> first step started",
    ("stepd", "step_to_next"): "stepd   step done -> next step started",
    ("stepd", "ready_to_start"): "stepd   ready -> next step started (in-process wake)",
    ("stepd", "poll_to_start"): "stepd   other process's row -> started (1 s poll)",
    ("stepd_pg", "create_to_start"): "stepd   PostgreSQL: create -> first step started",
    ("stepd_pg", "step_to_next"): "stepd   PostgreSQL: step done -> next step started",
    ("stepd_pg", "across_daemons"): "stepd   PostgreSQL: written on daemon A -> started on B",
    ("dbos", "create_to_start"): "DBOS    start_workflow -> step 1 started",
    ("dbos", "step_to_next"): "DBOS    step 1 done -> step 2 started",
    ("huey_default", "create_to_start"): "Huey    enqueue -> task 1 started (default polling)",
    ("huey_default", "step_to_next"): "Huey    task 1 done -> task 2 started (default)",
    ("huey_tuned", "create_to_start"): "Huey    enqueue -> task 1 started (tuned polling)",
    ("huey_tuned", "step_to_next"): "Huey    task 1 done -> task 2 started (tuned)",
}
PEERS = {"dbos": "DBOS", "huey_default": "Huey default", "huey_tuned": "Huey tuned"}
TARGETS = {"dbos": 3.0, "huey_default": 2.0, "huey_tuned": 2.0}  # issue 5: throughput


def fmt(value: float | None, spec: str = ".1f") -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return format(value, spec)


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def median_wf(results: dict[str, Any], key: str) -> float | None:
    entry = results["throughput"].get(key) or {}
    return entry.get("median_wf_per_s")


def p50(results: dict[str, Any], system: str, measure: str = "create_to_start") -> float | None:
    entry = results["latency"].get(system) or {}
    return (entry.get("stats") or {}).get(measure, {}).get("p50")


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """stepd/peer: throughput (higher is better for stepd) and first-step p50 (lower is)."""
    out: dict[str, dict[str, float | None]] = {}
    for peer in PEERS:
        peer_wf, peer_lat = median_wf(results, peer), p50(results, peer)
        row: dict[str, float | None] = {}
        for key in (
            "stepd_http_full",
            "stepd_inproc_full",
            "stepd_http_normal",
            "stepd_plain_full",
        ):
            ours = median_wf(results, key)
            row[f"throughput_{key}"] = ours / peer_wf if ours and peer_wf else None
        ours_lat = p50(results, "stepd")
        row["latency_p50_create_to_start"] = ours_lat / peer_lat if ours_lat and peer_lat else None
        ours_next, peer_next = (
            p50(results, "stepd", "step_to_next"),
            p50(results, peer, "step_to_next"),
        )
        row["latency_p50_step_to_next"] = ours_next / peer_next if ours_next and peer_next else None
        out[peer] = row
    return out


def table(results: dict[str, Any]) -> str:
    m, p = results["machine"], results["params"]
    versions = m.get("packages", {})
    names = {"dbos": versions.get("dbos") or "?", "huey": versions.get("huey") or "?"}
    lines = [
        f"stepd benchmark suite, {results['timestamp']}: {m['cpu_count']} CPUs "
        f"({m.get('cpu_model', '?')}), Python {m['python']}, SQLite {m['sqlite']}",
        f"W = {p['workflows']} two-step workflows, {p['runs']} run(s) each, medians; "
        f"{p['samples']} latency samples ({p['poll_samples']} for the poll path)",
        *([f"PostgreSQL {m['postgresql']}"] if m.get("postgresql") else []),
        *(
            [f"PostgreSQL rows: n/a, {results['postgresql_error']}"]
            if results.get("postgresql_error")
            else []
        ),
        "",
        f"{'Throughput':<52}{'wf/s':>9}{'steps/s':>10}{'min-max wf/s':>16}{'runs':>6}",
    ]
    for key, label in THROUGHPUT.items():
        entry = results["throughput"].get(key)
        if entry is None:
            continue
        label = label.format(**names)
        if entry.get("median_wf_per_s") is None:
            lines.append(f"  {label:<50}{'n/a':>9}   {entry.get('error', '')[:100]}")
            continue
        per_run = [r["wf_per_s"] for r in entry["runs"]]
        spread = f"{min(per_run):.0f}-{max(per_run):.0f}"
        lines.append(
            f"  {label:<50}{entry['median_wf_per_s']:>9.1f}{entry['median_steps_per_s']:>10.1f}"
            f"{spread:>16}{len(per_run):>6}"
        )
    lines += [
        "",
        f"{'Latency (ms, idle, one at a time)':<58}{'p50':>8}{'p95':>9}{'max':>9}{'n':>6}",
    ]
    for (system, measure), label in LATENCY.items():
        entry = results["latency"].get(system)
        if entry is None:
            continue
        s = (entry.get("stats") or {}).get(measure)
        if s is None or not s.get("n"):
            if entry.get("error") and measure == "create_to_start":
                lines.append(f"  {label:<56}{'n/a':>8}   {entry['error'][:100]}")
            continue
        lines.append(f"  {label:<56}{s['p50']:>8.2f}{s['p95']:>9.2f}{s['max']:>9.2f}{s['n']:>6}")
    lines += ["", "Ratios stepd/peer (throughput: > 1 means stepd is faster; "
              "first-step latency p50: < 1 means stepd is faster)"]  # fmt: skip
    for peer, row in results.get("ratios", {}).items():
        if all(v is None for v in row.values()):
            lines.append(f"  vs {PEERS[peer]:<13} n/a")
            continue
        target = TARGETS[peer]
        http = row.get("throughput_stepd_http_full")
        met = "" if http is None else ("  (target met)" if http >= target else "  (TARGET MISSED)")
        lines.append(
            f"  vs {PEERS[peer]:<13} throughput HTTP FULL {times(http)} (target >= "
            f"{target:.0f}x){met}; in-process {times(row.get('throughput_stepd_inproc_full'))}"
            f"; HTTP NORMAL {times(row.get('throughput_stepd_http_normal'))}"
            f"; plain client {times(row.get('throughput_stepd_plain_full'))}"
        )
        lines.append(
            f"  {'':<16} latency p50: submit -> first step "
            f"{fmt(row.get('latency_p50_create_to_start'), '.2f')}, step done -> next step "
            f"{fmt(row.get('latency_p50_step_to_next'), '.2f')}"
        )
    kill = results.get("huey_kill")
    if kill is not None:
        lines += ["", "Huey consumer SIGKILLed while running 50 ms tasks (2 workers), restarted:"]
        if "error" in kill:
            lines.append(f"  n/a: {kill['error']}")
        else:
            lines.append(
                f"  {kill['lost']} of {kill['tasks']} tasks never finished (a worker deletes a "
                "task from the queue when it takes it; stepd requeues interrupted steps)"
            )
    scale = results.get("scale")
    if scale is not None:
        lines += ["", "Scale (bench/scale.py, full figures in results.json under 'scale')"]
        if "error" in scale:
            lines.append(f"  n/a: {scale['error']}")
        else:
            lines += [
                "  " + ln
                for ln in results.get("scale_table", "").rstrip().splitlines()
                if not ln.rstrip().endswith("...")  # its progress lines
            ]
    return "\n".join(lines)


# -- charts -------------------------------------------------------------------------------


def charts(results: dict[str, Any], out: Path) -> list[Path]:
    """peers.png (throughput and first-step latency side by side) and latency.png
    (distributions); returns the files written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install -e '.[bench]')")
        return []
    written = [_peers_chart(plt, results, out / "peers.png")]
    written.append(_latency_chart(plt, results, out / "latency.png"))
    return written


def _color(key: str) -> str:
    if key.startswith("stepd"):
        return "#2b7bba"
    return {"dbos": "#d9822b", "huey_default": "#5aa05a", "huey_tuned": "#8cc98c"}.get(
        key, "#888888"
    )


def _peers_chart(plt: Any, results: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    keys = [k for k in THROUGHPUT if median_wf(results, k)]
    medians = [median_wf(results, k) or 0.0 for k in keys]
    lows, highs = [], []
    for key, med in zip(keys, medians, strict=True):
        per_run = [r["wf_per_s"] for r in results["throughput"][key]["runs"]]
        lows.append(med - min(per_run))
        highs.append(max(per_run) - med)
    x = range(len(keys))
    bars = left.bar(x, medians, color=[_color(k) for k in keys], yerr=[lows, highs], capsize=4)
    left.bar_label(bars, labels=[f"{v:.0f}" for v in medians], padding=3)
    left.set_xticks(list(x), [SHORT[k] for k in keys], fontsize=9)
    left.set_ylabel("workflows/s (median; bars: min-max over runs)")
    p = results["params"]
    left.set_title(f"Throughput: {p['workflows']} two-step workflows, {p['runs']} run(s)")
    left.grid(axis="y", alpha=0.3)

    systems = [s for s in ("stepd", "dbos", "huey_default", "huey_tuned") if p50(results, s)]
    labels = {"stepd": "stepd\n(HTTP)", "dbos": "DBOS", "huey_default": "Huey\ndefault",
              "huey_tuned": "Huey\ntuned"}  # fmt: skip
    values = [p50(results, s) or 0.0 for s in systems]
    p95s = [results["latency"][s]["stats"]["create_to_start"]["p95"] for s in systems]
    x2 = range(len(systems))
    right.bar(x2, values, color=[_color(s) for s in systems])
    right.scatter(x2, p95s, marker="_", s=400, color="black", label="p95", zorder=3)
    for i, (v, top) in enumerate(zip(values, p95s, strict=True)):
        right.annotate(f"p50 {v:.1f}", (i, max(v, top)), xytext=(0, 5),
                       textcoords="offset points", ha="center")  # fmt: skip
    right.set_xticks(list(x2), [labels[s] for s in systems], fontsize=9)
    right.set_ylabel("ms (bars: p50; ticks: p95)")
    right.set_ylim(0, max(p95s + values, default=1.0) * 1.15)
    right.set_title("Submit -> first step started, p50 (idle)")
    right.legend(loc="upper left")
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(ax: Any, values: list[float], label: str, **kw: Any) -> None:
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (p50 {statistics.median(xs):.1f} ms)", **kw)


def _latency_chart(plt: Any, results: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    stepd = (results["latency"].get("stepd") or {}).get("samples_ms") or {}
    names = {
        "create_to_start": "create -> first step",
        "step_to_next": "step done -> next step",
        "ready_to_start": "ready -> next step",
        "poll_to_start": "other process's row -> started (poll)",
    }
    for measure, label in names.items():
        if stepd.get(measure):
            _cdf(left, stepd[measure], label)
    left.set_xscale("log")
    left.set_xlabel("ms (log scale)")
    left.set_ylabel("fraction of samples")
    left.set_title("stepd latency distributions (idle daemon)")
    left.grid(alpha=0.3, which="both")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8, loc="lower right")

    peers = {"stepd": "stepd", "dbos": "DBOS", "huey_default": "Huey default",
             "huey_tuned": "Huey tuned"}  # fmt: skip
    for system, label in peers.items():
        samples = ((results["latency"].get(system) or {}).get("samples_ms") or {}).get(
            "create_to_start"
        )
        if samples:
            _cdf(right, samples, label, color=_color(system))
    right.set_xscale("log")
    right.set_xlabel("ms (log scale)")
    right.set_title("Submit -> first step started, all systems")
    right.grid(alpha=0.3, which="both")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py RESULTS.json")
    path = Path(sys.argv[1])
    results = orjson.loads(path.read_bytes())
    print(table(results))
    for written in charts(results, path.parent):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
