"""A heavier benchmark model, made at bench time: a small ResNet on 3x64x64 images.

Random (seeded) weights: it classifies nothing, it only costs what a real network of
its shape costs, so batching matters more than for the tiny digits CNN. It lives only
in a temporary model repository next to a copy of models/digits, never in models/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.stack import ROOT

HEAVY_MODEL = "resnet64"
HEAVY_SHAPE = (3, 64, 64)


def _build(seed: int) -> object:
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

    torch.manual_seed(seed)
    # ~0.13 GFLOP per image: stem to 32x32, then one block per stage at 32/64/128/256
    # channels, halving the resolution each stage (ResNet-18's shape, a quarter as deep).
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32, 32, 1),
        Block(32, 64, 2),
        Block(64, 128, 2),
        Block(128, 256, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).eval()
    with torch.no_grad():
        # Untrained BatchNorm is the identity; random statistics make it real work that
        # freezing folds into the convolutions, as it would for a trained network.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        return torch.jit.trace(net, torch.zeros(1, *HEAVY_SHAPE))


def make_repository(dest: Path, seed: int = 0) -> Path:
    """`dest` becomes a model repository with digits (copied) and the heavy model."""
    import torch

    shutil.copytree(ROOT / "models" / "digits", dest / "digits", dirs_exist_ok=True)
    version = dest / HEAVY_MODEL / "1"
    version.mkdir(parents=True, exist_ok=True)
    torch.jit.save(_build(seed), str(version / "model.pt"))
    config = {
        "name": HEAVY_MODEL,
        "version": 1,
        "platform": "torchscript",
        "description": f"ResNet-style benchmark net on 3x64x64, random weights (seed {seed}); bench only",
        "input": {"name": "image", "dtype": "float32", "shape": list(HEAVY_SHAPE)},
        "output": {"name": "logits", "kind": "logits"},
        "labels": [str(i) for i in range(10)],
        "max_batch_size": 32,
        "max_delay_ms": 2,
        "channels_last": True,
    }
    (version / "config.json").write_text(json.dumps(config, indent=2))
    return dest
