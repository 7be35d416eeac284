"""The page at / in a real browser (the system's headless chromium, driven by Playwright):
held-out digits drawn as pen strokes are read back as labels; a repeat shows the cached
flag; a 2,000-item bulk job shows progress to SUCCEEDED and its results download."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.stack import free_port
from tests.servers import ApiThread, MemcachedServer, RedisServer, Worker, stack_settings

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "page-test-token-0123456789abcdef"
# Grid of the strokes: 32x32 cells of CELL px, from OFFSET px into the 280 px canvas.
CELL, OFFSET = 7, 28


@pytest.fixture(scope="module")
def page_api(
    redis_server: RedisServer, memcached_server: MemcachedServer, worker: Worker
) -> Iterator[ApiThread]:
    api = ApiThread(
        stack_settings(redis_server, memcached_server, http_port=free_port(), auth_tokens=f"page:{TOKEN}")
    )
    yield api
    api.stop()


def upsampling(n_in: int = 8, n_out: int = 28) -> np.ndarray:
    """torch's bilinear (align_corners=False) along one axis, as a matrix [n_out, n_in]."""
    u = np.zeros((n_out, n_in))
    for d in range(n_out):
        s = max(0.0, (d + 0.5) * n_in / n_out - 0.5)
        a = int(s)
        b = min(a + 1, n_in - 1)
        u[d, a] += 1 - (s - a)
        u[d, b] += s - a
    return u


def strokes(image: np.ndarray) -> list[tuple[float, float, float]]:
    """A held-out 28x28 image as horizontal pen strokes (y, x from, x to) in canvas px:
    its 8x8 source (the upsampling inverted), as the 32x32 bitmap it was counted from
    (each cell's count of 16 filled column by column), one stroke per run of ink."""
    p = np.linalg.pinv(upsampling())
    counts = np.clip(np.rint(p @ image.reshape(28, 28) @ p.T * 16), 0, 16).astype(int)
    order = [(r, c) for c in range(4) for r in range(4)]
    bitmap = np.zeros((32, 32), bool)
    for j in range(8):
        for i in range(8):
            for r, c in order[: counts[j, i]]:
                bitmap[4 * j + r, 4 * i + c] = True
    out = []
    for row in range(32):
        col = 0
        while col < 32:
            if not bitmap[row, col]:
                col += 1
                continue
            start = col
            while col < 32 and bitmap[row, col]:
                col += 1
            y = OFFSET + row * CELL + CELL / 2
            out.append((y, OFFSET + start * CELL + CELL / 2, OFFSET + (col - 1) * CELL + CELL / 2))
    return out


def test_page_draws_digits_caches_and_runs_a_bulk_job(
    page_api: ApiThread, heldout: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = heldout
    shots = Path(os.environ.get("INFERPOOL_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"http://127.0.0.1:{page_api.server.http_port}/")
            box = page.locator("#canvas").bounding_box()
            assert box is not None

            def draw(image: np.ndarray) -> None:
                page.click("#clear")
                for sy, sx0, sx1 in strokes(image):
                    page.mouse.move(box["x"] + sx0, box["y"] + sy)
                    page.mouse.down()
                    page.mouse.move(box["x"] + sx1, box["y"] + sy, steps=2)
                    page.mouse.up()

            def ask() -> str:
                count = int(page.get_attribute("#answer", "data-count") or 0)
                page.click("#classify")
                page.wait_for_function(
                    f"Number(document.getElementById('answer').dataset.count) > {count} || "
                    "document.getElementById('error').textContent !== ''",
                    timeout=30_000,
                )
                return page.text_content("#label") or ""

            page.fill("#pen", str(CELL))
            page.dispatch_event("#pen", "input")
            # Without the token: the page says plainly what is wrong.
            draw(x[0])
            page.click("#classify")
            page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=30_000)
            assert "needs a valid token" in (page.text_content("#error") or "")
            page.fill("#token", TOKEN)

            n = 24
            labels = []
            for i in range(n):
                draw(x[i])
                labels.append(ask())
                if i == 0:
                    page.screenshot(path=str(shots / "http-page-draw.png"))
            correct = sum(label == str(int(t)) for label, t in zip(labels, y[:n], strict=True))
            print(f"page: {correct}/{n} drawn held-out digits read correctly")
            assert correct / n >= 0.9, (labels, y[:n].tolist())
            # The same drawing again: the answer comes from the cache, and the page says so.
            assert page.get_attribute("#cached", "data-cached") in ("true", "false")
            ask()
            assert page.get_attribute("#cached", "data-cached") == "true"
            assert "from the cache" in (page.text_content("#timing") or "")

            # Bulk: 2,000 items from a .npy, progress over SSE, then the download.
            items = np.concatenate([x] * 6)[:2000].astype(np.float32)
            items[:, 0, 0, 0] = np.arange(2000) / 4000  # distinct rows
            path = tmp_path / "bulk.npy"
            np.save(path, items)
            page.set_input_files("#file", str(path))
            page.click("#submit")
            page.wait_for_selector("#download:not([hidden])", timeout=120_000)
            assert page.text_content("#job-state") == "SUCCEEDED: 2000 of 2000"
            assert page.evaluate("document.getElementById('progress').value") == 2000
            page.screenshot(path=str(shots / "http-page.png"), full_page=True)
            with page.expect_download() as download:
                page.click("#download")
            lines = Path(download.value.path()).read_text().splitlines()
            assert len(lines) == 2000
            assert [json.loads(line)["index"] for line in lines] == list(range(2000))
        finally:
            browser.close()
