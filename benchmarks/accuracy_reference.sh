#!/usr/bin/env bash
# The reference training comparison committed under results/ (issue: train against the baselines). About 45 min on
# 2 CPU cores. Needs Fashion-MNIST: apt-get install dataset-fashion-mnist (or pass --data fashion-mnist:PATH).
# (a) the attention ablation at 49 tokens; (b) BiXT and ViT at 16, 49 and 196 tokens. The same recipe for both:
# 8,000 training images (a fixed draw), 6 epochs, 1 warm-up epoch, the first 5,000-image fixed draw of the test set.
set -euo pipefail
OUT=${1:-results}
RECIPE=(--data fashion-mnist --seeds 3 --epochs 6 --warmup-epochs 1 --train-samples 8000 --test-samples 5000)
bixt compare "${RECIPE[@]}" --baselines vit perceiver bixt-ablation --out "$OUT/fashion-mnist-ablation"
bixt compare "${RECIPE[@]}" --baselines vit --vary stride=7,4,2 --vary patch_size=7,8,4 \
  --out "$OUT/fashion-mnist-tokens"
