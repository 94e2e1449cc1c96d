#!/usr/bin/env bash
# The device run of issue 21 (paper-scale reproduction on a lent GPU). Run from the repository root
# on the device machine with .devdata (packed CIFAR-10 JPEGs, bench/pack_cifar.py) carried along.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout "${TRAIN_TIMEOUT:-555}" python3 bench/gpu_train.py --data .devdata --out "$OUT" \
    --small-epochs "${SMALL_EPOCHS:-100}" --paper-budget "${PAPER_BUDGET:-350}" 2>&1 | tee "$OUT/train.log"
ls -la "$OUT"
