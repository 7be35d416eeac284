"""scripts/miss_chain.py's recorder on a flow of known shape: what counts as leaving a
module (a finished frame, not a suspended coroutine) and as entering it again."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from scripts.miss_chain import ChainRecorder, chain_text

FLOW = """
import asyncio

async def serve(helper):
    helper.check()            # enters helper, leaves it
    await asyncio.sleep(0)    # suspends: serve is not left
    await helper.wait()       # enters helper again: a re-entry
    return "done"
"""
HELPER = """
import asyncio

def check():
    return True

async def wait():
    await asyncio.sleep(0)
"""


def _load(path: Path, text: str) -> ModuleType:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"chain_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_suspended_coroutine_has_not_left_and_a_second_call_is_a_reentry(tmp_path: Path) -> None:
    flow, helper = _load(tmp_path / "api" / "flow.py", FLOW), _load(tmp_path / "api" / "helper.py", HELPER)
    recorder = ChainRecorder(begin="api/flow.py", root=str(tmp_path) + "/")

    async def run() -> str:
        recorder.start()
        sys.setprofile(recorder.profile)
        try:
            result: str = await flow.serve(helper)
        finally:
            sys.setprofile(None)
        return result

    assert asyncio.run(run()) == "done"
    report = recorder.report()
    assert [(m, f) for _, m, f in report["steps"]] == [
        ("api/flow.py", "serve"),
        ("api/helper.py", "check"),
        ("api/helper.py", "wait"),
    ]
    assert report["modules"] == report["package_modules"] == ["api/flow.py", "api/helper.py"]
    assert report["reentered"] == [("api/helper.py", "wait")]
    assert report["open"] == []
    assert "re-entered: api/helper.py" in chain_text(report)
