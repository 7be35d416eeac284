"""Reads a Prometheus /metrics endpoint: samples, sums over label sets, histogram deltas.

Every benchmark scrapes through here. Differences between two scrapes (`delta`) are
what a measured run caused; counters and histograms are cumulative since start-up.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

# (metric sample name, sorted (label, value) pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse(response.read().decode())


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every label set that has `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def delta(before: Samples, after: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def histogram_mean(samples: Samples, name: str, **labels: str) -> float:
    """Mean of histogram `name` (its _sum over its _count), NaN when it saw nothing."""
    count = total(samples, f"{name}_count", **labels)
    return total(samples, f"{name}_sum", **labels) / count if count else float("nan")


def buckets(samples: Samples, name: str, by: str, **labels: str) -> dict[str, dict[float, float]]:
    """Cumulative buckets of histogram `name`, grouped by the value of label `by`."""
    want = set(labels.items())
    out: dict[str, dict[float, float]] = {}
    for (n, lbl), value in samples.items():
        if n != f"{name}_bucket" or not want <= set(lbl):
            continue
        d = dict(lbl)
        group = out.setdefault(d.get(by, ""), {})
        le = float(d["le"])
        group[le] = group.get(le, 0.0) + value
    return out


def quantile_bounds(
    cumulative: Mapping[float, float], qs: tuple[float, ...] = (0.5, 0.99)
) -> list[float | None]:
    """The upper bound (in the histogram's unit) of the bucket holding each quantile."""
    ordered = sorted(cumulative.items())
    count = ordered[-1][1] if ordered else 0.0
    out: list[float | None] = []
    for q in qs:
        out.append(next((le for le, n in ordered if count and n >= q * count), None))
    return out
