"""A harness cell: one system, model, workload and load, measured `repeats` times.

Each run records what the generator saw (bench/loadgen.py's Run summary) and the CPU
each process of the server tree used over it (bench/procs.py). A cell reports the
spread of its runs (min / median / max), not just a median, and says when its figures
cannot be trusted:

- a `miss` cell any of whose replies came from the cache fails (the workload promised
  every input new);
- a run whose generator's event-loop lag p99 passed loadgen.MAX_LAG_P99_MS is left
  out of the figures (the generator, not the server, set its pace); a cell with no run
  left is marked invalid;
- errors, and CPU taken meanwhile by processes outside the server and the generator
  (or stolen by the hypervisor), are shown.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import MAX_LAG_P99_MS

# Cores taken by processes outside the measured ones (or stolen) past which a cell says so.
MAX_OUTSIDE_CORES = 0.2


def spread(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]  # NaN out
    if not vals:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": min(vals), "median": float(statistics.median(vals)), "max": max(vals)}


def cpu_record(
    cpu_s: dict[str, float], ok: int, window_s: float, machine_s: dict[str, float], gen_cpu_s: float
) -> dict[str, Any]:
    """CPU per request per process (ms), their sum, the cores each kept busy, and the
    cores the rest of the machine took meanwhile: processes neither server nor
    generator (another tenant, the benchmark itself) and the hypervisor's steal. The
    queue path hands each request between several processes, so CPU taken by anything
    else slows it more than a one-process server: these say whether a run had the
    machine to itself."""
    per_request = {name: s * 1000 / ok if ok else float("nan") for name, s in sorted(cpu_s.items())}
    outside = machine_s["busy"] - sum(cpu_s.values()) - gen_cpu_s
    return {
        "server_cpu_s": cpu_s,
        "server_cpu_ms_per_request": per_request,
        "server_cpu_total_ms_per_request": sum(per_request.values()) if ok else float("nan"),
        "server_cores_busy": {name: s / window_s for name, s in cpu_s.items()} if window_s else {},
        "outside_cores_busy": outside / window_s if window_s and cpu_s else float("nan"),
        "steal_cores": machine_s["steal"] / window_s if window_s else float("nan"),
    }


@dataclass
class Cell:
    system: str
    model: str
    workload: str
    mode: str  # closed | open
    load: float  # concurrency (closed) or offered req/s (open)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept(self) -> list[dict[str, Any]]:
        """The runs the figures come from: those whose generator kept up."""
        kept = [r for r in self.runs if not r.get("discarded")]
        return kept or self.runs

    def add(self, run: dict[str, Any]) -> None:
        lag = run.get("gen_lag_p99_ms", 0.0)
        if lag == lag and lag > MAX_LAG_P99_MS:
            run["discarded"] = f"generator lag p99 {lag:.1f} ms > {MAX_LAG_P99_MS:g} ms"
        self.runs.append(run)

    def median(self, key: str) -> float:
        return spread([r[key] for r in self.kept])["median"]

    def spread(self, key: str) -> dict[str, float]:
        return spread([r[key] for r in self.kept])

    def cpu(self) -> dict[str, dict[str, float]]:
        """Spread of the CPU ms per request of each server process, and of their sum."""
        names = sorted({n for r in self.kept for n in r.get("server_cpu_ms_per_request", {})})
        out = {n: spread([r["server_cpu_ms_per_request"].get(n, 0.0) for r in self.kept]) for n in names}
        if names:
            out["total"] = spread([r["server_cpu_total_ms_per_request"] for r in self.kept])
        return out

    def problems(self) -> list[str]:
        found = []
        cached = sum(r["cached"] for r in self.runs)
        if self.workload == "miss" and cached:
            found.append(f"FAIL: {cached} of {sum(r['ok'] for r in self.runs)} miss replies were cached")
        if all(r.get("discarded") for r in self.runs):
            found.append(f"INVALID: every run's generator lag p99 > {MAX_LAG_P99_MS:g} ms")
        elif any(r.get("discarded") for r in self.runs):
            found.append(
                f"{sum(bool(r.get('discarded')) for r in self.runs)} run(s) left out (generator lag)"
            )
        outside = self.median("outside_cores_busy") if self.runs else float("nan")
        if outside == outside and outside > MAX_OUTSIDE_CORES:
            found.append(f"other processes took {outside:.2f} cores")
        steal = self.median("steal_cores") if self.runs else float("nan")
        if steal == steal and steal > MAX_OUTSIDE_CORES:
            found.append(f"hypervisor steal {steal:.2f} cores")
        errors = sum(sum(r["errors"].values()) for r in self.runs)
        if errors:
            found.append(f"{errors} errors")
        return found

    @property
    def valid(self) -> bool:
        return not any(p.startswith(("FAIL", "INVALID")) for p in self.problems())

    def summary(self) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        for r in self.runs:
            errors.update(r["errors"])
        sent = sum(r["sent"] for r in self.runs)
        distinct = sum(r["distinct_inputs"] for r in self.runs)
        return {
            "system": self.system,
            "model": self.model,
            "workload": self.workload,
            "mode": self.mode,
            "load": self.load,
            "valid": self.valid,
            "problems": self.problems(),
            "rps": self.spread("rps"),
            "p50_ms": self.spread("p50_ms"),
            "p99_ms": self.spread("p99_ms"),
            "server_cpu_ms_per_request": self.cpu(),
            "gen_cpu_ms_per_request": self.spread("gen_cpu_ms_per_request"),
            "gen_lag_p50_ms": self.spread("gen_lag_p50_ms"),
            "gen_lag_p99_ms": self.spread("gen_lag_p99_ms"),
            "outside_cores_busy": self.spread("outside_cores_busy"),
            "steal_cores": self.spread("steal_cores"),
            "requests_sent": sent,
            "distinct_inputs": distinct,
            "cached_replies": sum(r["cached"] for r in self.runs),
            "errors": dict(errors),
            "shed": sum(r["shed"] for r in self.runs),
            "runs": self.runs,
        }


def find(cells: list[Cell], system: str, model: str, workload: str, load: float) -> Cell | None:
    """The valid closed-loop cell of these coordinates, if measured."""
    for c in cells:
        if (c.system, c.model, c.workload, c.mode, c.load) == (system, model, workload, "closed", load):
            return c if c.valid else None
    return None
