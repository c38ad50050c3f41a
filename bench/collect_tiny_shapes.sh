#!/usr/bin/env bash
# Gather what bench/train_tiny_shapes.sh made in WORKDIR into OUT (at most 8 files, each < 16 MB): the logs and
# metrics as one tarball, and the assembled pipeline split in parts (before it exists: the text encoder and DC-AE).
#   bash bench/collect_tiny_shapes.sh WORKDIR OUT
set -uo pipefail
W=${1:?WORKDIR}; OUT=${2:?OUT}
cd "$W" || exit 1
logs=(stages.tsv runs/*/log.jsonl runs/*/config.json runs/shapes-autoencoder/final/metrics.json runs/*eval*.json
      data/shapes-cache/cache.json)
tar czf "$OUT/logs.tar.gz" $(ls "${logs[@]}" 2>/dev/null)
if [ -f runs/sana-tiny-shapes/model_index.json ]; then
  tar cf - -C runs sana-tiny-shapes | split -b 15m - "$OUT/pipeline.tar.part-"
elif [ -d runs/shapes-autoencoder/final/vae ] && [ -d runs/shapes-text-encoder/final/text_encoder ]; then
  tar czf - runs/shapes-text-encoder/final runs/shapes-autoencoder/final | split -b 15m - "$OUT/encoders.tgz.part-"
fi
ls -la "$OUT"
