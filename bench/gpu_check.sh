#!/usr/bin/env bash
# The backend benchmark on one NVIDIA GPU, self-contained: run from the repository root
# on a fresh machine with Python 3 (and torch, or pip that can install it). Model alone,
# per backend (torchscript, torch_export with its AOTInductor build, onnxruntime), per
# precision (fp32, fp16, bf16) and batch size (1, 8, 64, 256), on cuda. Every step is
# bounded and the script goes on past a failed one; about 6 minutes at most.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# Writes $OUT/gpu_backends.json (the figures), $OUT/gpu_env.txt (what the machine has)
# and $OUT/gpu_check.log. Wheels in .whl/ (e.g. protobuf, which the repository's
# generated code needs at 7.x) are installed first, without the network.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $(date -u +%T) $*"; }

PY=python3
step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; $PY --version 2>&1
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|onnx|onnxruntime|onnxruntime-gpu|numpy|protobuf|grpcio|scikit-learn) " ; } > "$OUT/gpu_env.txt"
cat "$OUT/gpu_env.txt"

# A venv that sees the system's packages (torch with CUDA is usually there already).
step "venv"
if timeout 60 $PY -m venv --system-site-packages /tmp/inferpool-gpu-venv; then
  PY=/tmp/inferpool-gpu-venv/bin/python
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  step "wheels from .whl/"
  timeout 60 $PY -m pip install -q --no-index --no-deps .whl/*.whl || echo "wheel install failed"
fi
timeout 30 $PY -c "import torch" 2>/dev/null || { step "pip install torch"; timeout 240 $PY -m pip install -q torch || echo "no torch"; }
timeout 30 $PY -c "import inferpool.repository" 2>/dev/null || {
  step "pip install protobuf 7 (the generated code's runtime)"; timeout 60 $PY -m pip install -q "protobuf>=7,<8" || echo "no protobuf 7"; }
timeout 30 $PY -c "import onnxruntime" 2>/dev/null || { step "pip install onnxruntime-gpu"; timeout 90 $PY -m pip install -q onnxruntime-gpu || echo "no onnxruntime"; }
timeout 60 $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# The exported forms again from models/digits' weights with this torch: a .pt2 saved by
# another torch version may not load. The shipped ones stay when this fails.
MODELS="$PWD/models"
step "export with this machine's torch"
rm -rf /tmp/inferpool-gpu-models && cp -r models /tmp/inferpool-gpu-models
if timeout 120 $PY models/export.py --models-dir /tmp/inferpool-gpu-models; then
  MODELS=/tmp/inferpool-gpu-models
else
  echo "export failed: the shipped model files are used"
fi

step "benchmark: model alone on cuda, fp32/fp16/bf16, batch 1/8/64/256, with AOTInductor"
timeout 250 $PY -m bench.backends --device cuda --no-stack --aoti --precisions fp32,fp16,bf16 \
  --batch-sizes 1,8,64,256 --seconds 0.5 --repeats 3 --models-dir "$MODELS" --out "$OUT/gpu_backends.json" \
  || { echo "with AOTInductor it failed or ran out of time: again without";
       timeout 80 $PY -m bench.backends --device cuda --no-stack --precisions fp32,fp16,bf16 \
         --batch-sizes 1,8,64,256 --seconds 0.3 --repeats 3 --models-dir "$MODELS" --out "$OUT/gpu_backends.json"; }
step "done"
ls -la "$OUT"
