"""Writes the digits model's weights in the other backends' forms, beside models/digits:

    models/digits_export/1/{model.pt2, config.json}   torch.export (platform torch_export)
    models/digits_onnx/1/{model.onnx, config.json}    ONNX (platform onnxruntime)

Both come from models/digits/1/model.pt's weights (loaded into models/train_digits.py's
DigitsCNN), with a dynamic batch dimension, and are checked on the held-out set before
they are written over the old ones: same top-1 as the TorchScript model on every image,
probabilities within AGREEMENT_ATOL. Needs `onnx` and `onnxscript` (the exporter), not
at serving time:

    python models/export.py [--models-dir models]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import DigitsCNN

# Largest difference of one class probability allowed between the forms (fp32 all).
AGREEMENT_ATOL = 1e-4
# The exported forms take any batch from 1 to this; the worker's batches are far smaller.
MAX_BATCH = 4096


def load_weights(models_dir: Path) -> DigitsCNN:
    scripted = torch.jit.load(str(models_dir / "digits" / "1" / "model.pt"), map_location="cpu")
    model = DigitsCNN()
    model.load_state_dict(scripted.state_dict())
    return model.eval()


def export_program(model: torch.nn.Module, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, 1, 28, 28)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, 1, 28, 28)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    assert program is not None
    program.save(str(path))


def config_for(name: str, platform: str, base: dict[str, object], accuracy: float) -> dict[str, object]:
    config = dict(base)
    config.update(
        name=name,
        platform=platform,
        description=f"models/digits/1's weights as {platform} (models/export.py)",
        heldout_accuracy=round(accuracy, 4),
    )
    config.pop("channels_last", None)  # a TorchScript layout choice
    return config


def probabilities(run: object, x: np.ndarray) -> np.ndarray:
    logits = np.asarray(run(x), dtype=np.float64)  # type: ignore[operator]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    models_dir: Path = args.models_dir
    torch.manual_seed(0)
    model = load_weights(models_dir)
    base = json.loads((models_dir / "digits" / "1" / "config.json").read_text())
    held = np.load(models_dir / "digits" / "heldout.npz")
    x, y = held["x"].astype(np.float32), held["y"]

    import onnxruntime as ort

    with torch.inference_mode():
        reference = probabilities(lambda a: model(torch.from_numpy(a)).numpy(), x)
    with tempfile.TemporaryDirectory() as tmp:
        pt2, onnx_file = Path(tmp) / "model.pt2", Path(tmp) / "model.onnx"
        export_program(model, pt2)
        export_onnx(model, onnx_file)
        program = torch.export.load(str(pt2)).module()
        with torch.inference_mode():
            exported = probabilities(lambda a: program(torch.from_numpy(a)).numpy(), x)
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        onnx_probs = probabilities(lambda a: session.run(None, {"image": a})[0], x)
        failed = False
        for name, probs in (("torch_export", exported), ("onnxruntime", onnx_probs)):
            same_top1 = bool((probs.argmax(1) == reference.argmax(1)).all())
            diff = float(np.abs(probs - reference).max())
            acc = float((probs.argmax(1) == y).mean())
            print(f"{name}: held-out accuracy {acc:.4f}, same top-1 {same_top1}, max prob diff {diff:.2e}")
            failed |= not same_top1 or diff > AGREEMENT_ATOL
        if failed:
            print(f"an exported form disagrees with model.pt (atol {AGREEMENT_ATOL})", file=sys.stderr)
            return 1
        acc_ref = float((reference.argmax(1) == y).mean())
        for name, platform, file in (
            ("digits_export", "torch_export", pt2),
            ("digits_onnx", "onnxruntime", onnx_file),
        ):
            out = models_dir / name / "1"
            out.mkdir(parents=True, exist_ok=True)
            (out / file.name).write_bytes(file.read_bytes())
            config = config_for(name, platform, base, acc_ref)
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            print(f"wrote {out / file.name} ({file.stat().st_size} bytes) and its config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
