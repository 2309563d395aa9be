#!/bin/bash
cd /work/main
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python scripts/train_default_model.py train --family qwen3_moe \
  --steps 10000 --batch 8 --seq 256 --lr 1.5e-3 --warmup 200 --bf16 --threads 1 \
  --router-lr-mult 1.0 --router-init-std 0.02 --aux 0.01 --zloss 0.001 \
  --tokenizer src/allocmoe/assets/default_model --train-file corpus_build/train.txt \
  --out-dir training_wip/qwen3_moe --ckpt-dir corpus_build/qwen3_ckpt --save-minutes 20 --ckpt-minutes 10 \
  --log-every 250 "$@"
