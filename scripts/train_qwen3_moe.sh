#!/bin/bash
# The Qwen3-MoE built-in model's training command (issue 20; TRAINING.md beside the model has the record).
# Steps 0-5,448 ran with --bf16 (bf16 autocast) and a 10,000-step schedule on a machine with bf16 matmul units;
# from step 5,448 the schedule ends at 6,500 (the issue's ~6 h of one core) and training runs in fp32, since the
# later machine (AVX2, no AVX512-BF16) runs bf16 matmuls ~40x slower than fp32.
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python scripts/train_default_model.py train --family qwen3_moe \
  --steps 6500 --batch 8 --seq 256 --lr 1.5e-3 --warmup 200 --threads 1 \
  --router-lr-mult 1.0 --router-init-std 0.02 --aux 0.01 --zloss 0.001 \
  --tokenizer src/allocmoe/assets/default_model --train-file corpus_build/train.txt \
  --out-dir training_wip/qwen3_moe --ckpt-dir corpus_build/qwen3_ckpt --save-minutes 20 --ckpt-minutes 10 \
  --log-every 250 "$@"
