#!/usr/bin/env bash
# The CUDA checks in one go, from source (no install needed beyond torch, timm, typer, rich, safetensors,
# torchmetrics, simplejpeg and pytest): the tests marked `cuda`, the training-step benchmark at ViT-B/16
# on the GPU, and the data pipelines on this host's CPU. Results go to $OUT (default: cuda-check/).
#   bash scripts/cuda-check.sh            # or: make cuda-check (inside the venv)
set -uo pipefail
out=${OUT:-cuda-check}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1 || status=1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    >"$out/torch.txt" 2>&1 || status=1
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest-cuda.log" || status=1
python3 -m stages bench --device cuda --preset vit-b --json >"$out/bench-vit-b.json" \
    2>"$out/bench-vit-b.err" || status=1
python3 -m stages bench --sample-photos 200 --img-size 224 --seconds 3 --json >"$out/bench-data.json" \
    2>"$out/bench-data.err" || status=1
cat "$out"/*.json
exit $status
