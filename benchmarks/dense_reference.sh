#!/usr/bin/env bash
# The reference dense comparison committed under results/ (issue: dense prediction): BiXT against ViT (a per-token
# head on its patch tokens) and the Perceiver with a Perceiver IO decoder, on the two generated dense tasks, 2 seeds,
# each data kind's default recipe (partshapes: 10 epochs; segscenes: 15). About 40 min on 2 CPU cores.
set -euo pipefail
OUT=${1:-results}
# part segmentation: 2,000 training clouds of 256 points, the matched point-cloud models (bixt_shapes' sizes)
bixt compare --data partshapes:train=2000 --baselines vit perceiver --seeds 2 --model-arg seq_len=256 \
  --out "$OUT/partshapes-dense"
# semantic segmentation of 28 px scenes, per-token logits upsampled to the pixels: 49 and 196 tokens
bixt compare --data segscenes --baselines vit perceiver --seeds 2 --vary stride=4,2 --vary patch_size=8,4 \
  --out "$OUT/segscenes-dense"
