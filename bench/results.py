"""Where every benchmark writes its JSON, and what each file says about its run.

A result is `bench/results/<name>/<UTC date and time>-<short commit>.json` (committed:
history lives there and in git) holding `meta` (the date, the commit and whether the
tree had uncommitted changes, the command line, the machine: CPUs, CPU model, memory,
load average) beside the benchmark's own figures.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.stack import ROOT

RESULTS = ROOT / "bench" / "results"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: figures travel only with it."""
    cpu_model = platform.processor() or platform.machine()
    memory_bytes = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_bytes = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": memory_bytes,
        "arch": platform.machine(),
        "python": platform.python_version(),
        # Another tenant on the cores moves every figure: the load when the run began.
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": _gpus(),
    }


def _gpus() -> list[str]:
    """The GPUs the workers may have used (nvidia-smi's names), [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def meta(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": _command(),
        "machine": machine(),
        **(extra or {}),
    }


def _command() -> str:
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.is_relative_to(ROOT) and script.suffix == ".py":
        module = ".".join(script.relative_to(ROOT).with_suffix("").parts)
        return " ".join(["python -m", module, *sys.argv[1:]])
    return " ".join(sys.argv)


def default_path(name: str, info: dict[str, Any]) -> Path:
    stamp = info["date"].replace("-", "").replace(":", "")[:13]  # 20261204T1620
    return RESULTS / name / f"{stamp}Z-{(info['commit'] or 'nocommit')[:7]}.json"


def write(
    name: str, data: dict[str, Any], out: Path | None = None, info: dict[str, Any] | None = None
) -> Path:
    """Writes `{"meta": ..., **data}` to `out` or the dated default path; returns it.
    A default path already written (two runs in one minute) gets a `-2`, `-3`, ...
    suffix rather than losing the earlier result."""
    info = info or meta()
    path = out or default_path(name, info)
    if out is None:
        base, n = path, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.stem}-{n}{base.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": info, **data}, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, sets and paths as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)
