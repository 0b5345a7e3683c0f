#!/usr/bin/env bash
# The GPU checks in one go, on a machine with CUDA (and the project installed: make install):
#   bash scripts/gpu_check.sh            # bf16-mixed, QLoRA bf16 compute, FSDP on every GPU,
#                                        # DDP on 2 GPUs, peak GPU memory vs the memory plan
# Prints each test's figures (-s) and ends with pytest's summary; exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; \
print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
exec "$PYTHON" -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py "$@"
