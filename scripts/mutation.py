#!/usr/bin/env python3
"""Curated mutation testing: each named mutation breaks one promise, and the named
tests must fail on it.

The mutations live in tests/mutations.toml. Each one names a file, an exact source
snippet that must occur there exactly once, its replacement, the promise the change
breaks, and the pytest node ids that must kill it. For every mutation the runner:

1. copies the tracked (and untracked, not ignored) files of this tree into a fresh
   temporary directory, so the working tree is never modified, even when the run is
   interrupted;
2. replaces the snippet there;
3. runs only the named tests, from that copy (PYTHONPATH points at it, so the worker
   processes the tests start import the mutated code too), with a time limit;
4. counts the mutation killed when pytest reports a failure or runs past the limit,
   survived when the tests pass.

It exits non-zero when any mutation survives, when a snippet is missing or occurs more
than once (the code drifted: the mutation no longer tests what it says), or when a named
test does not exist, unless the entry carries `awaits` (a test another branch adds: it
is reported as "test missing" until that branch is merged, then `awaits` is removed).

A mutation may list `[[mutation.alt]]` forms (find, replace, and optionally file and
tests) for code that another branch reshapes: the first form whose snippet occurs
exactly once is used, and the report names it. Once the branches are merged, keep the
form that matches and delete the others.

Updating a mutation whose snippet drifted: open the file, find the line the promise
lives on now, and copy the shortest exact text (indentation inside a multi-line snippet
included) that occurs once in the file into `find`; keep `replace` the smallest change
that breaks the promise. `python scripts/mutation.py --check` verifies every snippet and
test id without running anything (seconds), `--only ID[,ID]` runs a few, `--list` prints
them.

Why curated and not mutmut / cosmic-ray over the whole modules: see the decisions page
(docs): each mutant needs real servers and a worker process (5-40 s), so only a chosen set
fits a CI budget on two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = ROOT / "tests" / "mutations.toml"

KILLED, SURVIVED, TIMEOUT, MISSING, DRIFTED, ERROR = (
    "killed",
    "SURVIVED",
    "killed (timeout)",
    "test missing",
    "SNIPPET DRIFTED",
    "ERROR",
)


@dataclass
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    promise: str
    tests: list[str]
    awaits: str = ""  # the branch or helper expected to add a missing test
    # Other forms of the same mutation, for code another branch reshapes: (file, find,
    # replace, tests); the first whose snippet occurs exactly once is used.
    alts: list[tuple[str, str, str, list[str]]] = field(default_factory=list)
    variant: str = ""  # which form was used ("" the main one, "alt N")
    outcome: str = ""
    seconds: float = 0.0
    detail: str = ""
    missing: list[str] = field(default_factory=list)

    @property
    def module(self) -> str:
        return self.file


def load(path: Path) -> list[Mutation]:
    data = tomllib.loads(path.read_text())
    mutations = []
    seen: set[str] = set()
    for raw in data.get("mutation", []):
        unknown = set(raw) - {"id", "file", "find", "replace", "promise", "tests", "awaits", "alt"}
        if unknown:
            raise SystemExit(f"{path}: mutation {raw.get('id')!r} has unknown keys {sorted(unknown)}")
        alts = []
        for alt in raw.get("alt", []):
            if set(alt) - {"file", "find", "replace", "tests"} or not {"find", "replace"} <= set(alt):
                raise SystemExit(f"{path}: mutation {raw['id']!r}: an alt has find, replace, [file, tests]")
            alts.append(
                (
                    alt.get("file", raw["file"]),
                    alt["find"],
                    alt["replace"],
                    list(alt.get("tests", raw["tests"])),
                )
            )
        m = Mutation(
            id=raw["id"],
            file=raw["file"],
            find=raw["find"],
            replace=raw["replace"],
            promise=raw["promise"],
            tests=list(raw["tests"]),
            awaits=raw.get("awaits", ""),
            alts=alts,
        )
        if m.id in seen:
            raise SystemExit(f"{path}: duplicate mutation id {m.id!r}")
        if not m.tests:
            raise SystemExit(f"{path}: mutation {m.id!r} names no test")
        if m.find == m.replace:
            raise SystemExit(f"{path}: mutation {m.id!r} changes nothing")
        seen.add(m.id)
        mutations.append(m)
    return mutations


def _count(file: str, find: str) -> int:
    source = ROOT / file
    return source.read_text().count(find) if source.is_file() else 0


def check_snippet(m: Mutation) -> str:
    """'' when the snippet (or one of its alternatives, then used from here on) occurs
    exactly once, else why not."""
    count = _count(m.file, m.find)
    if count == 1:
        return ""
    for n, (file, find, replace, tests) in enumerate(m.alts, start=1):
        if _count(file, find) == 1:
            m.file, m.find, m.replace, m.tests, m.variant = file, find, replace, tests, f"alt {n}"
            return ""
    where = f"{m.file}" + (f" (nor any of its {len(m.alts)} alternatives)" if m.alts else "")
    return f"snippet occurs {count} times in {where}, must be exactly once: {m.find!r}"


def tree_files() -> list[str]:
    """What a clean clone plus uncommitted work holds: tracked files and untracked ones
    git does not ignore (not the venv, caches or build outputs)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and ((ROOT / p).is_file() or (ROOT / p).is_symlink())]


def copy_tree(files: list[str], dest: Path) -> None:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_symlink():
            # inferpool/api and inferpool/workers: the link, not a copy of what it points to
            # (the copy's own api/ and workers/ are what the mutation changes).
            target.symlink_to((ROOT / rel).readlink())
        else:
            shutil.copy2(ROOT / rel, target)


def collect(python: str, node_ids: list[str]) -> set[str]:
    """The node ids among `node_ids` that pytest finds in this tree (one collection run)."""
    files = sorted({n.split("::", 1)[0] for n in node_ids if (ROOT / n.split("::", 1)[0]).is_file()})
    if not files:
        return set()
    run = subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    found = {line.strip() for line in run.stdout.splitlines() if "::" in line}
    # A parametrized test is found when any of its cases is.
    return {n for n in node_ids if n in found or any(f.startswith(n + "[") for f in found)}


def run_one(m: Mutation, files: list[str], python: str, timeout_s: float, keep: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"mutation-{m.id}-"))
    try:
        copy_tree(files, workdir)
        target = workdir / m.file
        text = target.read_text()
        if text.count(m.find) != 1:  # the tree changed since --check
            m.outcome, m.detail = DRIFTED, "snippet not found in the copy"
            return
        target.write_text(text.replace(m.find, m.replace, 1))
        env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
        args = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
        args += ["--no-header", "-o", "addopts=", *m.tests]
        t0 = time.monotonic()
        # Its own session: on timeout the whole group goes (pytest and the servers it started).
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            m.seconds = time.monotonic() - t0
            m.outcome, m.detail = TIMEOUT, f"ran past {timeout_s:.0f} s"
            return
        run = subprocess.CompletedProcess(args, proc.returncode, out, "")
        m.seconds = time.monotonic() - t0
        tail = (run.stdout + run.stderr).strip().splitlines()
        # The first assertion error shows what the tests saw (a kill for the right reason).
        errors = [line.strip() for line in tail if line.startswith("E ")]
        m.detail = (errors[0][:160] + " | " if errors else "") + (tail[-1] if tail else "")
        if run.returncode == 0:
            m.outcome = SURVIVED
        elif run.returncode == 1:
            m.outcome = KILLED
        else:  # 2 interrupted, 3 internal error, 4 usage (unknown node id), 5 nothing collected
            m.outcome = ERROR
            m.detail = f"pytest exit {run.returncode}: " + "\n".join(tail[-15:])
    finally:
        if keep:
            print(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(mutations: list[Mutation], wall_s: float) -> int:
    width = max(len(m.id) for m in mutations)
    for m in mutations:
        line = f"{m.id:<{width}}  {m.outcome:<16} {m.seconds:6.1f} s  {m.file}"
        line += f" ({m.variant})" if m.variant else ""
        print(line)
        if m.outcome not in (KILLED, TIMEOUT):
            print(f"    promise: {m.promise}")
        if m.detail:
            print("    " + m.detail.replace("\n", "\n    "))
    per_module: dict[str, list[Mutation]] = defaultdict(list)
    for m in mutations:
        if m.outcome in (KILLED, TIMEOUT, SURVIVED):
            per_module[m.module].append(m)
    print("\nscore per module (killed / run):")
    for module, ms in sorted(per_module.items()):
        killed = sum(m.outcome in (KILLED, TIMEOUT) for m in ms)
        print(f"  {module:<28} {killed}/{len(ms)}  {100 * killed / len(ms):5.1f}%")
    run = [m for m in mutations if m.outcome in (KILLED, TIMEOUT, SURVIVED)]
    killed = sum(m.outcome in (KILLED, TIMEOUT) for m in run)
    score = 100 * killed / len(run) if run else 0.0
    missing = [m for m in mutations if m.outcome == MISSING]
    print(
        f"\nmutation score: {killed}/{len(run)} = {score:.1f}%"
        + (f"; {len(missing)} not run (test missing)" if missing else "")
        + f"; wall time {wall_s:.0f} s"
    )
    bad = [m for m in mutations if m.outcome in (SURVIVED, DRIFTED, ERROR)]
    bad += [m for m in missing if not m.awaits]
    for m in missing:
        note = f" (expected from {m.awaits})" if m.awaits else ""
        print(f"test missing{note}: {m.id}: {', '.join(m.missing)}")
    if bad:
        print(f"FAILED: {', '.join(m.id + ' ' + m.outcome for m in bad)}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the mutations (TOML)")
    parser.add_argument("--only", default="", help="comma-separated ids to run")
    parser.add_argument("--check", action="store_true", help="verify snippets and test ids; run nothing")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--timeout-s", type=float, default=240, help="per mutation")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run side by side")
    parser.add_argument("--keep", action="store_true", help="keep each mutated copy (for debugging)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first run every named test on the unmutated tree (CI skips it: `make test` just did)",
    )
    args = parser.parse_args(argv)

    mutations = load(args.file)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in mutations}
        if unknown:
            parser.error(f"unknown ids: {sorted(unknown)}")
        mutations = [m for m in mutations if m.id in wanted]
    if args.list:
        for m in mutations:
            print(f"{m.id}: {m.file}: {m.promise}\n    killed by {', '.join(m.tests)}")
        return 0

    t0 = time.monotonic()
    for m in mutations:
        if why := check_snippet(m):
            m.outcome, m.detail = DRIFTED, why
    found = collect(args.python, [n for m in mutations if not m.outcome for n in m.tests])
    for m in mutations:
        if m.outcome:
            continue
        m.missing = [n for n in m.tests if n not in found]
        if m.missing:
            m.outcome = MISSING
    if args.check:
        for m in mutations:
            m.outcome = m.outcome or "ok"
        bad = [m for m in mutations if m.outcome == DRIFTED or (m.outcome == MISSING and not m.awaits)]
        for m in mutations:
            via = f" ({m.variant})" if m.variant else ""
            print(f"{m.id:<40} {m.outcome}{via}" + (f": {m.detail}" if m.detail else ""))
            if m.missing:
                print(f"    missing: {', '.join(m.missing)}" + (f" (awaits {m.awaits})" if m.awaits else ""))
        return 1 if bad else 0

    files = tree_files()
    todo = [m for m in mutations if not m.outcome]
    if args.baseline:
        # A test that fails without any mutation would count every mutation killed.
        names = sorted({n for m in todo for n in m.tests})
        print(f"[baseline] {len(names)} tests on the unmutated tree", flush=True)
        base = subprocess.run(
            [args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *names],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=args.timeout_s * 4,
        )
        if base.returncode != 0:
            print("FAILED: the named tests fail without any mutation; fix them first")
            return 1
    if args.jobs <= 1:
        for m in todo:
            print(f"[{m.id}] {' '.join(m.tests)}", flush=True)
            run_one(m, files, args.python, args.timeout_s, args.keep)
            print(f"  {m.outcome} in {m.seconds:.1f} s", flush=True)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            for m, _ in zip(
                todo,
                pool.map(lambda m: run_one(m, files, args.python, args.timeout_s, args.keep), todo),
                strict=True,
            ):
                print(f"[{m.id}] {m.outcome} in {m.seconds:.1f} s", flush=True)
    return report(mutations, time.monotonic() - t0)


if __name__ == "__main__":
    sys.exit(main())
