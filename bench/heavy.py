"""Heavier benchmark models, made at bench time: small ResNets with random weights.

- `resnet64`: on 3x64x64 images, the harness's heavy model (batching matters more
  than for the tiny digits CNN);
- `resnet28`: on digits-sized 1x28x28 inputs, ResNet-18's depth at twice its widths,
  for the overload bench: ~20x resnet64's compute per image behind a 3 KB request, so
  a pool's capacity is low enough for one generator process on a small machine to
  offer 10x of it.

Random (seeded) weights: they classify nothing, they only cost what a real network of
their shape costs. They live only in a temporary model repository next to a copy of
models/digits, never in models/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.stack import ROOT

HEAVY_MODEL = "resnet64"
HEAVY_SHAPE = (3, 64, 64)
OVERLOAD_MODEL = "resnet28"
OVERLOAD_SHAPE = (1, 28, 28)
# name: (input shape, stem stride, stage widths, blocks per stage, max_batch_size)
_NETS: dict[str, tuple[tuple[int, ...], int, tuple[int, ...], int, int]] = {
    # ~0.13 GFLOP per image: stem to 32x32, then one block per stage at 32/64/128/256
    # channels, halving the resolution each stage (ResNet-18's shape, a quarter as deep).
    HEAVY_MODEL: (HEAVY_SHAPE, 2, (32, 64, 128, 256), 1, 32),
    # ~3 GFLOP per image: full resolution stem, ResNet-18's depth at twice its widths.
    # Small batches: a batch of 32 would take longer than a second on one CPU core.
    OVERLOAD_MODEL: (OVERLOAD_SHAPE, 1, (128, 256, 512, 1024), 2, 8),
}


def _build(seed: int, name: str) -> object:
    import torch
    from torch import nn

    class Block(nn.Module):
        """The ResNet basic block: two 3x3 convolutions and a (projected) shortcut."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    shape, stem_stride, widths, depth, _ = _NETS[name]
    torch.manual_seed(seed)
    stages: list[nn.Module] = []
    cin = widths[0]
    for stage, cout in enumerate(widths):
        stages.append(Block(cin, cout, 1 if stage == 0 else 2))
        stages.extend(Block(cout, cout, 1) for _ in range(depth - 1))
        cin = cout
    net = nn.Sequential(
        nn.Conv2d(shape[0], widths[0], 3, stem_stride, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1], 10),
    ).eval()
    with torch.no_grad():
        # Untrained BatchNorm is the identity; random statistics make it real work that
        # freezing folds into the convolutions, as it would for a trained network.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        return torch.jit.trace(net, torch.zeros(1, *shape))


def make_repository(dest: Path, seed: int = 0, models: tuple[str, ...] = (HEAVY_MODEL,)) -> Path:
    """`dest` becomes a model repository with digits (copied) and the named heavy models."""
    shutil.copytree(ROOT / "models" / "digits", dest / "digits", dirs_exist_ok=True)
    for name in models:
        _save(dest, seed, name)
    return dest


def _save(dest: Path, seed: int, name: str) -> None:
    import torch

    shape = _NETS[name][0]
    version = dest / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    torch.jit.save(_build(seed, name), str(version / "model.pt"))
    dims = "x".join(map(str, shape))
    config = {
        "name": name,
        "version": 1,
        "platform": "torchscript",
        "description": f"ResNet-style benchmark net on {dims}, random weights (seed {seed}); bench only",
        "input": {"name": "image", "dtype": "float32", "shape": list(shape)},
        "output": {"name": "logits", "kind": "logits"},
        "labels": [str(i) for i in range(10)],
        "max_batch_size": _NETS[name][4],
        "max_delay_ms": 2,
        "channels_last": True,
    }
    (version / "config.json").write_text(json.dumps(config, indent=2))
