#!/usr/bin/env bash
# The figures of the long preset (configs/shapes_long.yaml, 60 epochs): `diffloop train
# shapes_long.yaml` for seeds 0 1 2, the runs' own held-out evaluation (scripts/summarize_seeds.py),
# then the broad check: every run and the base scored on ALL 316 val_pair prompts x 2 images
# (220 of them never in a run's own evaluation) with other noise (eval seed 777, not the runs'
# eval.seed 12345), with the runs' sampler.
#
#   scripts/shapes_long_check.sh [RUNS_DIR]          # default runs/shapes_long_check
#
# Cost: each run trains five times the default's 12 epochs; then the broad check.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
RUNS=${1:-runs/shapes_long_check}
PYTHON=${PYTHON:-python}
mkdir -p "$RUNS"
for s in 0 1 2; do
    if [ ! -f "$RUNS/seed$s/eval/before_after.png" ]; then  # written when a run ends
        start=$(date +%s)
        "$PYTHON" -m diffloop train shapes_long.yaml seed=$s output_dir="$RUNS/seed$s" resume=true \
            logging.progress_bars=false
        echo "seed $s: whole command $(( $(date +%s) - start )) s" | tee -a "$RUNS/wall_clock.txt"
    fi
done
"$PYTHON" scripts/summarize_seeds.py "$RUNS"/seed0 "$RUNS"/seed1 "$RUNS"/seed2
"$PYTHON" -m diffloop eval shapes --compare "$RUNS"/seed0 "$RUNS"/seed1 "$RUNS"/seed2 \
    --prompts shapes/val_pair --images-per-prompt 2 --reward shapes_binding \
    --eta 1.0 --seed 777 --output "$RUNS/other_prompts_other_noise"
