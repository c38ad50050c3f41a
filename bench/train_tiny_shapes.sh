#!/usr/bin/env bash
# Reproduce sana-tiny-shapes from nothing: the data, the three trainings, the cache, the pipeline and ShapesEval.
#
#   bash bench/train_tiny_shapes.sh WORKDIR          (from the repository root; N=60000 images by default)
#
# Every stage is one `sana` command (the same as in configs/shapes/*.toml) run in WORKDIR, whose relative paths
# data/ and runs/ the configs use. Stage times go to WORKDIR/stages.tsv; a stage that finished is skipped when
# the script runs again, and the trainings resume from their checkpoints.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:?usage: train_tiny_shapes.sh WORKDIR}
N=${N:-60000}
SANA=${SANA:-sana}
CFG=$REPO/configs/shapes
EVAL_N=${EVAL_N:-600}
# SMOKE=1: a few steps of every stage on tiny batches (checks the script end to end on a CPU).
SMOKE_SET=()
if [ "${SMOKE:-0}" = 1 ]; then
  SMOKE_SET=(--set schedule.max_steps=3 --set data.batch_size=4 --set data.holdout=8 --set data.num_workers=0)
fi
mkdir -p "$W" && cd "$W"

stage() {  # stage NAME DONE-MARKER COMMAND...
  local name=$1 marker=$2; shift 2
  if [ -e "$marker" ]; then echo "=== $name: done before"; return; fi
  echo "=== $(date +%T) $name: $*"
  local t0=$SECONDS
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> stages.tsv
}

stage data data/shapes/shapes.json \
  $SANA data shapes --out data/shapes --n "$N" --size 256 --seed 1 --no-progress
stage text-encoder runs/shapes-text-encoder/final/text_encoder \
  $SANA train "$CFG/text-encoder.toml" --set logging.progress=false "${SMOKE_SET[@]}"
stage autoencoder runs/shapes-autoencoder/final/vae \
  $SANA train "$CFG/autoencoder.toml" --set logging.progress=false "${SMOKE_SET[@]}"
stage cache data/shapes-cache/index.json \
  $SANA cache "$CFG/transformer.toml" data/shapes-cache --batch-size 256 --no-progress \
  --set data.source=folder --set data.path=data/shapes
stage transformer runs/shapes-transformer/final \
  $SANA train "$CFG/transformer.toml" --set logging.progress=false "${SMOKE_SET[@]}"
stage assemble runs/sana-tiny-shapes/model_index.json \
  $SANA assemble runs/sana-tiny-shapes --transformer runs/shapes-transformer/final \
  --autoencoder runs/shapes-autoencoder/final --text-encoder runs/shapes-text-encoder/final --flow-shift 1.0
stage eval runs/shapes-eval.json \
  $SANA eval shapes --model runs/sana-tiny-shapes --n "$EVAL_N" --train-dir data/shapes --dtype float32 \
  --json runs/shapes-eval.json
echo "=== $(date +%T) all stages done"
