#!/usr/bin/env bash
# The README's figures for the default run: `diffloop train` (configs/shapes.yaml) for seeds 0 1 2,
# the run's own held-out evaluation (scripts/summarize_seeds.py), then the generalisation check:
# every run and the base scored on ALL 316 val_pair prompts (seen and unseen combinations)
# x 1 image (220 of them never in a run's own evaluation) with other noise (eval seed 777, not the runs' eval.seed 12345), with the runs' sampler.
#
#   scripts/shapes_default_check.sh [RUNS_DIR]          # default runs/shapes_default_check
#
# CONFIG (default shapes.yaml) and IMAGES (images per prompt of the broad check, default 1) let
# scripts/shapes_long_check.sh measure another preset the same way.
#
# Cost on this project's 2-core CPU: about 6 minutes per seed, then ~2 minutes of evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
RUNS=${1:-runs/shapes_default_check}
CONFIG=${CONFIG:-shapes.yaml}
IMAGES=${IMAGES:-1}
PYTHON=${PYTHON:-python}
mkdir -p "$RUNS"
for s in 0 1 2; do
    if [ ! -f "$RUNS/seed$s/eval/before_after.png" ]; then  # written when a run ends
        start=$(date +%s)
        "$PYTHON" -m diffloop train "$CONFIG" seed=$s output_dir="$RUNS/seed$s" resume=true logging.progress_bars=false
        echo "seed $s: whole command $(( $(date +%s) - start )) s" | tee -a "$RUNS/wall_clock.txt"
    fi
done
"$PYTHON" scripts/summarize_seeds.py "$RUNS"/seed0 "$RUNS"/seed1 "$RUNS"/seed2
"$PYTHON" -m diffloop eval shapes --compare "$RUNS"/seed0 "$RUNS"/seed1 "$RUNS"/seed2 \
    --prompts shapes/val_pair --images-per-prompt "$IMAGES" --reward shapes_binding \
    --eta 1.0 --seed 777 --output "$RUNS/other_prompts_other_noise"
