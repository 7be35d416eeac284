"""Trains models/digits/1: a small CNN on scikit-learn's bundled digits, upsampled to 28x28.

Reproducible (seeded, deterministic kernels, one thread): the weights come out
bit-identical run to run, though model.pt's bytes do not (TorchScript archives carry
a random serialization id). About 15 s of training on 2 CPU cores. Writes the
TorchScript model, its repository config and the held-out set the demo and the tests
classify:

    python models/train_digits.py [--out-dir models] [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
SIZE = 28


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Strided convolutions instead of pooling: a tenth of the multiply-adds of a
        # pooled CNN of the same width, so serving overhead, not the model, is what
        # benchmarks see on a CPU.
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1),  # 14x14
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),  # 7x7
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=SEED, stratify=digits.target)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Small random affine jitter: the upsampled 8x8 digits are few (1,437), and shifts
    # are the variation real inputs have.
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * 0.2
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.15
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def accuracy(model: nn.Module | torch.jit.ScriptModule, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        # Twice: a frozen module's first calls are the JIT's profiling runs, and the
        # optimized graph only takes over after them.
        model(x)
        return float((model(x).argmax(1) == y).float().mean())


def reload_accuracies(path: Path, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of the saved file as loaded plainly, as the worker loads it, and
    fully optimized, so a model that only works eagerly is caught here, not in serving."""

    def load() -> torch.jit.ScriptModule:
        return torch.jit.load(str(path), map_location="cpu").eval()

    x_cl = x.contiguous(memory_format=torch.channels_last)
    # Module.to's stubs omit memory_format, which it accepts at run time.
    cl_weights = load().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return {
        "reloaded": accuracy(load(), x, y),
        # workers/runtime.py: freeze, then channels_last inputs.
        "frozen, channels_last input": accuracy(torch.jit.freeze(load()), x_cl, y),
        "channels_last weights, frozen, optimize_for_inference": accuracy(
            torch.jit.optimize_for_inference(torch.jit.freeze(cl_weights)), x_cl, y
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)

    x_train, y_train, x_test, y_test = load_data()
    model = DigitsCNN()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(augment(x_train[batch], gen)), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 5 == 0:
            model.eval()
            held_out = accuracy(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out {held_out:.4f}")
    train_s = time.perf_counter() - t0
    model.eval()
    acc = accuracy(model, x_test, y_test)

    version_dir = args.out_dir / "digits" / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(version_dir / "model.pt"))
    config = {
        "name": "digits",
        "version": 1,
        "platform": "torchscript",
        "description": "Small CNN for 28x28 grayscale digits (0-9), trained on scikit-learn's "
        "load_digits upsampled; see models/train_digits.py",
        "input": {"name": "image", "dtype": "float32", "shape": [1, SIZE, SIZE]},
        "output": {"name": "logits", "kind": "logits"},
        "labels": [str(i) for i in range(10)],
        "max_batch_size": 64,
        "max_delay_ms": 2,
        "channels_last": True,
        "heldout_accuracy": round(acc, 4),
    }
    (version_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    np.savez_compressed(
        args.out_dir / "digits" / "heldout.npz", x=x_test.numpy().astype(np.float32), y=y_test.numpy()
    )

    print(f"parameters {params:,}  train {train_s:.1f}s  held-out accuracy {acc:.4f} on {len(y_test)} images")
    changed = False
    for how, reloaded_acc in reload_accuracies(version_dir / "model.pt", x_test, y_test).items():
        print(f"  saved model, {how}: {reloaded_acc:.4f}")
        changed |= abs(reloaded_acc - acc) > 1e-6
    if acc < 0.97 or changed:
        print("held-out accuracy below 0.97 or changed after reload", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
