"""The harness's tables, targets and plot, from its cells (bench/cells.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.cells import Cell, find
from bench.heavy import HEAVY_MODEL

PROCESSES = ("api", "worker", "redis", "memcached", "flower", "honcho", "server")
STACKS = ("inferpool", "inferpool, no Flower", "b4 naive")


def targets(cells: list[Cell], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals, each a ratio or a figure within this run (only valid cells count)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, value: float | None, need: float, unit: str, higher: bool = True) -> None:
        ok = None if value is None or value != value else (value >= need if higher else value <= need)
        rows.append(
            {
                "target": name,
                "value": value,
                "need": f"{'>=' if higher else '<='} {need:g}{unit}",
                "unit": unit,
                "result": "n/a" if ok is None else ("PASS" if ok else "MISS"),
            }
        )

    def cell(system: str, workload: str, load: int, model: str = "digits") -> Cell | None:
        return find(cells, system, model, workload, load)

    def ratio(a: Cell | None, b: Cell | None, key: str = "rps") -> float | None:
        return a.median(key) / b.median(key) if a and b else None

    def cpu(c: Cell | None) -> float | None:
        return c.cpu().get("total", {}).get("median") if c else None

    miss = {c: cell("inferpool", "miss", c) for c in (1, 8, 64)}
    b2 = {c: cell("b2 threads", "miss", c) for c in (8, 64)}
    row("miss @1: p50", miss[1].median("p50_ms") if miss[1] else None, 3.5, " ms", higher=False)
    row("miss @8: throughput vs b2 threads", ratio(miss[8], b2[8]), 1.0, "x")
    row("miss @64: throughput vs b2 threads", ratio(miss[64], b2[64]), 1.5, "x")
    row("miss @64: p99 vs b2's p99", ratio(miss[64], b2[64], "p99_ms"), 1.2, "x", higher=False)
    row("miss @8: server CPU per request", cpu(miss[8]), 0.8, " ms", higher=False)
    row("miss @64: server CPU per request", cpu(miss[64]), 0.4, " ms", higher=False)
    row("miss @8: with Flower vs without", ratio(miss[8], cell("inferpool, no Flower", "miss", 8)), 0.9, "x")
    row(
        "hit @64: throughput vs b3 floor",
        ratio(cell("inferpool", "hit", 64), cell("b3 floor", "hit", 64)),
        0.7,
        "x",
    )
    row("miss @64: throughput vs b4 naive", ratio(miss[64], cell("b4 naive", "miss", 64)), 6, "x")
    row("miss @64: vs b5 batcher (context)", ratio(miss[64], cell("b5 batcher", "miss", 64)), 1.0, "x")
    for key, model, context in (("bulk", "digits", ""), ("bulk_heavy", HEAVY_MODEL, " (context)")):
        bulk, raw = extra.get(key), extra.get("raw", {}).get(model)
        if bulk or model == "digits":
            value = bulk["items_per_s"] / raw["best_items_per_s"] if bulk and raw else None
            row(f"{model} bulk job: items/s vs b1 raw (best batch){context}", value, 0.4, "x")
    heavy = ratio(cell("inferpool", "miss", 64, HEAVY_MODEL), cell("b2 threads", "miss", 64, HEAVY_MODEL))
    if heavy is not None:
        row(f"{HEAVY_MODEL} miss @64: vs b2 threads (context)", heavy, 1.5, "x")
    return rows


def _range(c: Cell, key: str, fmt: str = ",.0f") -> str:
    s = c.spread(key)
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def print_report(
    cells: list[Cell], extra: dict[str, Any], target_rows: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    print(
        f"\nClosed loop: median [min-max] of {args.repeats} runs of {args.seconds:g} s; server CPU = the "
        "server tree's CPU ms per answered request; gen = the load generator; other = cores taken by "
        "everything else"
    )
    print(
        f"{'model':<9}{'wl':<5}{'conc':>5}  {'system':<21}{'req/s [min-max]':>24}{'p50 ms':>8}{'p99 ms':>9}"
        f"{'server CPU':>11}{'gen CPU':>9}{'gen lag p99':>12}{'other':>7}  notes"
    )
    closed = sorted(
        (c for c in cells if c.mode == "closed"),
        key=lambda c: (c.model != "digits", ["miss", "hit", "zipf"].index(c.workload), c.load),
    )
    for c in closed:
        total = c.cpu().get("total", {}).get("median", float("nan"))
        print(
            f"{c.model:<9}{c.workload:<5}{c.load:>5}  {c.system:<21}{_range(c, 'rps'):>24}"
            f"{c.median('p50_ms'):>8.2f}{c.median('p99_ms'):>9.2f}{total:>11.3f}"
            f"{c.median('gen_cpu_ms_per_request'):>9.3f}{c.median('gen_lag_p99_ms'):>12.1f}"
            f"{c.median('outside_cores_busy'):>7.2f}  " + "; ".join(c.problems())
        )
    print("\nServer CPU per request by process, ms (median of the runs)")
    seen = {name for c in closed for name in c.cpu()} - {"total"}
    columns = [p for p in PROCESSES if p in seen] + sorted(seen - set(PROCESSES))
    print(f"{'system':<21}{'wl':<5}{'conc':>5}" + "".join(f"{p:>10}" for p in columns) + f"{'total':>10}")
    for c in closed:
        if c.model != "digits" or c.workload == "zipf":
            continue
        per = c.cpu()
        line = f"{c.system:<21}{c.workload:<5}{c.load:>5}"
        line += "".join(f"{per[p]['median']:>10.3f}" if p in per else f"{'-':>10}" for p in columns)
        print(line + f"{per.get('total', {}).get('median', float('nan')):>10.3f}")
    for c in cells:
        if c.workload == "miss":
            s = c.summary()
            if s["distinct_inputs"] != s["requests_sent"] or s["cached_replies"]:
                print(
                    f"  {c.system} miss {c.load}: {s['distinct_inputs']} distinct of {s['requests_sent']} "
                    f"sent, {s['cached_replies']} cached replies"
                )
    misses = [c.summary() for c in cells if c.workload == "miss"]
    print(
        f"miss cells: {sum(s['requests_sent'] for s in misses):,} requests, "
        f"{sum(s['distinct_inputs'] for s in misses):,} distinct inputs, "
        f"{sum(s['cached_replies'] for s in misses)} cached replies"
    )
    opens = [c for c in cells if c.mode == "open"]
    if opens:
        print("\nOpen loop (miss), offered req/s -> achieved req/s, p50/p99 ms (from the scheduled send)")
        for c in opens:
            print(
                f"  {c.system:<21}{c.model:<9}{c.load:>7,.0f} -> {c.median('rps'):>7,.0f}"
                f"   {c.median('p50_ms'):>7.2f} / {c.median('p99_ms'):<8.2f}"
            )
    for model, r in extra.get("raw", {}).items():
        print(
            f"\nb1 raw {model}: best batch {r['best_batch']}: {r['best_items_per_s']:,.0f} items/s"
            + "  (by batch: "
            + ", ".join(f"{k}: {v:,.0f}" for k, v in r["by_batch"].items())
            + ")"
        )
    for key in ("bulk", "bulk_heavy"):
        if key in extra:
            b = extra[key]
            print(
                f"bulk job, {b['model']} x {b['items']}: {b['items_per_s']:,.0f} items/s "
                f"(compute phase {b['compute_items_per_s']:,.0f}, "
                f"after the upload {b['after_upload_items_per_s']:,.0f})"
            )
            cpu = b.get("server_cpu_us_per_item", {})
            if cpu:
                print(
                    "  CPU µs per item (median): "
                    + ", ".join(f"{k} {v['median']:.1f}" for k, v in cpu.items())
                )
    for system, mean in extra.get("envelope_items_mean", {}).items():
        note = (
            "  NOTE: not 1: check INFERPOOL_MAX_ENVELOPE_ITEMS"
            if system == "b4 naive" and mean > 1.05
            else ""
        )
        print(f"{system}: {mean:.2f} misses per queue message (inferpool_envelope_items mean){note}")
    for system, on in extra.get("task_events_on", {}).items():
        print(f"{system}: worker task events {'on (Flower reached it)' if on else 'off'}")
    print("\nTargets (within this run; invalid cells count as missing)")
    for t in target_rows:
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        print(f"  {t['target']:<58}{value:>10}   need {t['need']:<10}{t['result']:>6}")


def plot(cells: list[Cell], repeats: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    models = [m for m in ("digits", HEAVY_MODEL) if any(c.model == m for c in cells)]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes[0], models, strict=True):
        series: dict[tuple[str, str, str], list[Cell]] = {}
        for c in cells:
            if c.model == model:
                series.setdefault((c.system, c.workload, c.mode), []).append(c)
        for n, ((system, workload, mode), cs) in enumerate(sorted(series.items())):
            # In load order: past saturation throughput may fall as concurrency rises,
            # and the curve should show that rather than fold back on itself.
            cs.sort(key=lambda c: c.load)
            x = [c.median("rps") for c in cs]
            label = f"{system} {workload}{' (open)' if mode == 'open' else ''}"
            color, marker = colors[n % len(colors)], "s" if mode == "open" else "o"
            ax.plot(x, [c.median("p50_ms") for c in cs], marker=marker, color=color, label=f"{label} p50")
            ax.plot(
                x, [c.median("p99_ms") for c in cs], marker=marker, color=color, linestyle="--", alpha=0.6
            )
            if mode == "closed":
                for c, xi in zip(cs, x, strict=True):
                    ax.annotate(f"{c.load:g}", (xi, c.median("p50_ms")), fontsize=6, color=color)
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel("latency (ms; solid p50, dashed p99)")
        ax.set_yscale("log")
        ax.set_title(f"{model}: latency vs throughput (median of {repeats})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
