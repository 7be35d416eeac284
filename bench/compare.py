"""Before and after in one run: the quick harness's headline cells for this working tree
and for a git ref, side by side.

    python -m bench.harness --baseline-ref main [--seconds S] [--repeats N] [--generators N]

The ref's tracked files are exported (`git archive`) into a temporary directory, and
that copy runs its own processes: its Procfile, its API and worker code, its model
files, on ports of its own. (An export rather than `git worktree add`: nothing is
registered in the repository, so a run that is killed leaves nothing to prune.) The
load generator and the client are this tree's for both.

Both stacks run at once, as `make up` runs them (Flower on), and each cell is measured
on this tree and then on the ref before the next cell starts, so a busy machine's drift
lands on both alike. Cells: digits miss at 64 in flight, hit at 64, miss at 1. One table
shows each side's median req/s, p50 and p99, and the ratio this tree / ref.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import procs
from bench.stack import ROOT, LocalStack

if TYPE_CHECKING:
    from bench.harness import Bench

CELLS = (("miss", 64), ("hit", 64), ("miss", 1))
THIS_TREE = "this tree"


def resolve(ref: str) -> str:
    """The commit `ref` names (a typo fails here, before anything starts)."""
    run = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise SystemExit(f"--baseline-ref {ref}: not a commit here ({run.stderr.strip()})")
    return run.stdout.strip()


@contextmanager
def exported(commit: str) -> Iterator[Path]:
    """The tracked files of `commit` in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="inferpool-baseline-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


def compare(bench: Bench, ref: str) -> list[dict[str, Any]]:
    """Measures CELLS on this tree and on `ref`, interleaved; prints and returns the rows."""
    commit = resolve(ref)
    base_name = f"{ref} ({commit[:8]})"
    with ExitStack() as stack:
        tree = stack.enter_context(exported(commit))
        sides: list[tuple[str, LocalStack]] = []
        for name, root in ((THIS_TREE, ROOT), (base_name, tree)):
            bench.log(f"{name}: the Procfile stack from {root}")
            local = stack.enter_context(LocalStack(extra_env={"PYTHONPATH": str(root)}, root=root))
            if not local.task_events_on:
                bench.log(f"  WARNING: {name}: Flower had not turned task events on; measuring anyway")
            sides.append((name, local))
        for _, local in sides:
            bench.warm(local.target, "digits", hits=True)
        for workload, concurrency in CELLS:
            for name, local in sides:
                bench.measure(
                    name,
                    _tree(local),
                    local.target,
                    "digits",
                    workload,
                    concurrency=concurrency,
                )
    rows = table(bench, base_name)
    print_table(rows, ref, commit, bench.args)
    return rows


def _tree(stack: LocalStack) -> Callable[[], list[int]]:
    """The pids of `stack`'s processes, read at each call."""
    return lambda: procs.tree(stack.pid)


def table(bench: Bench, base_name: str) -> list[dict[str, Any]]:
    rows = []
    for workload, concurrency in CELLS:
        cells = {
            c.system: c
            for c in bench.cells
            if (c.workload, c.load, c.mode) == (workload, concurrency, "closed")
        }
        work, base = cells[THIS_TREE], cells[base_name]
        row: dict[str, Any] = {"cell": f"{workload}@{concurrency}"}
        for key in ("rps", "p50_ms", "p99_ms"):
            row[key] = {"tree": work.median(key), "ref": base.median(key)}
            row[key]["ratio"] = row[key]["tree"] / row[key]["ref"] if row[key]["ref"] else float("nan")
        row["problems"] = work.problems() + base.problems()
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], ref: str, commit: str, args: Any) -> None:
    print(
        f"\nThis tree against {ref} ({commit[:8]}): median of {args.repeats} runs of {args.seconds:g} s "
        "each, interleaved; ratio = this tree / ref (req/s: above 1 is faster; ms: below 1 is faster)"
    )
    print(
        f"{'cell':<9}{'req/s tree':>11}{'req/s ref':>11}{'ratio':>7}"
        f"{'p50 tree':>10}{'p50 ref':>9}{'ratio':>7}{'p99 tree':>10}{'p99 ref':>9}{'ratio':>7}  notes"
    )
    for r in rows:
        rps, p50, p99 = r["rps"], r["p50_ms"], r["p99_ms"]
        print(
            f"{r['cell']:<9}{rps['tree']:>11,.0f}{rps['ref']:>11,.0f}{rps['ratio']:>7.3f}"
            f"{p50['tree']:>10.2f}{p50['ref']:>9.2f}{p50['ratio']:>7.3f}"
            f"{p99['tree']:>10.2f}{p99['ref']:>9.2f}{p99['ratio']:>7.3f}  " + "; ".join(r["problems"])
        )
