#!/usr/bin/env bash
# The accelerator check, ready for a lent device machine (docs/performance.md section 10):
# about 5 minutes. That machine has torch, timm, typer and onnxruntime but not pydantic or
# simplejpeg, and no CIFAR-10 folders (bench.gpu then makes synthetic JPEGs of the same size).
# Once, here:  echo /.whl/ >> .git/info/exclude; pip download (README of the device tool) of
#              pydantic, pydantic-core, annotated-types, typing-inspection, simplejpeg into .whl
# Then, with the device tool:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, timm, tlkd; print('torch', torch.__version__, 'timm', timm.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.device_count())" || exit 1
timeout 450 python3 -m bench.gpu --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
