"""The base install (no extras) is a working client and CLI that imports only what it declares.

`pip install .` gives the client SDK and the `inferpool` command; celery, redis,
pymemcache and torch come only with the `api` / `worker` extras, so nothing the client
or the CLI imports may need them.

The fresh-venv test needs no network: the project's wheel is built here, and the base
dependencies (pyproject's `dependencies` and what they require in turn, nothing else)
are installed into the new venv from the distributions of the running one, file by file
as their RECORD lists them. pip then installs the wheel with `--no-index`, so a
dependency the project needs but does not declare fails the install or the import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.servers import ApiThread

ROOT = Path(__file__).resolve().parents[2]

# Top-level modules that only the server extras bring (or that are the server itself).
SERVER_ONLY = (
    "celery",
    "kombu",
    "redis",
    "pymemcache",
    "aiomcache",
    "torch",
    "prometheus_client",
    "opentelemetry",
)

CHECK = f"""
import json, sys
import inferpool.client, inferpool.cli
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({SERVER_ONLY!r}))
print(json.dumps({{"loaded": loaded, "from": inferpool.__file__}}))
"""


def test_client_and_cli_import_no_server_dependency() -> None:
    """The same check in the dev venv, where those packages are installed and would be
    imported if anything reached for them: seconds, where the fresh venv takes a minute."""
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["loaded"] == []


def base_closure() -> dict[str, metadata.Distribution]:
    """The base install's dependencies as this venv has them: pyproject's `dependencies`
    and, recursively, what each requires on this platform without extras."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(r) for r in declared]
    found: dict[str, metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), (req, dist.version)
        found[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or ())
    return found


def install_from_this_venv(dists: dict[str, metadata.Distribution], site: Path) -> None:
    """Copies each distribution's files (its RECORD: modules, extension libraries, its
    .dist-info) into `site`, where pip then finds it installed. Scripts outside
    site-packages are left out: the test needs none of them."""
    for dist in dists.values():
        for file in dist.files or ():
            if file.parts[0] == "..":
                continue
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


@pytest.mark.timeout(900)
def test_base_install_in_a_fresh_venv(
    api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """`pip install` of the project's wheel (the declared dependencies, nothing else)
    into a new venv, without network, then the import check, `inferpool --help`, and a
    real Classify through the installed CLI."""
    # A copy, so that the build's egg-info and build/ land in it, not in the checkout
    # (where two test runs would race on them).
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "*_cache"
        ),
    )
    # Nothing of this checkout or the dev venv on the path: only what the install put there.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    wheels = tmp_path / "wheels"
    # The wheel is built by this venv's setuptools: no build isolation, no index.
    pip_wheel = ["pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    build = subprocess.run(
        [sys.executable, "-m", *pip_wheel, "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-4000:]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, inferpool = venv / "bin" / "python", venv / "bin" / "inferpool"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    assert site.is_dir(), site
    closure = base_closure()
    assert not set(closure) & {canonicalize_name(m) for m in SERVER_ONLY}, sorted(closure)
    install_from_this_venv(closure, site)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "inferpool"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env
    )
    installed = {canonicalize_name(d["name"]) for d in json.loads(listed.stdout)}
    # venv's own pip (and, before Python 3.12, setuptools) besides the project and its closure.
    assert installed - {"pip", "setuptools"} == {"inferpool", *closure}, sorted(installed)
    # One import root: the servers' code installs as inferpool.api and inferpool.workers
    # (real folders in site-packages, not links), and no top-level `api` or `workers`.
    assert not (site / "api").exists() and not (site / "workers").exists()
    for package in ("api", "workers"):
        folder = site / "inferpool" / package
        assert folder.is_dir() and not folder.is_symlink() and (folder / "__init__.py").is_file()
    assert (site / "inferpool" / "api" / "http" / "static").is_dir()

    run = subprocess.run(
        [str(python), "-c", CHECK], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["loaded"] == []
    assert Path(report["from"]).is_relative_to(venv)

    run = subprocess.run([str(inferpool), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0 and "classify" in run.stdout, run.stderr

    x, y = heldout
    np.save(tmp_path / "some.npy", x[:5])
    run = subprocess.run(
        [str(inferpool), "--target", api.target, "classify", str(tmp_path / "some.npy"), "--model", "digits"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert sum(r["classes"][0]["index"] == label for r, label in zip(rows, y[:5], strict=True)) >= 4
