#!/usr/bin/env bash
# The figures of the long preset (configs/shapes_long.yaml, 36 epochs): `diffloop train
# shapes_long.yaml` for seeds 0 1 2, the runs' own held-out evaluation (scripts/summarize_seeds.py),
# then the broad check: every run and the base scored on ALL 316 val_pair prompts x 2 images
# (220 of them never in a run's own evaluation) with other noise (eval seed 777, not the runs'
# eval.seed 12345), with the runs' sampler.
#
#   scripts/shapes_long_check.sh [RUNS_DIR]          # default runs/shapes_long_check
#
# Cost: each run trains three times the default's 12 epochs (31 min for seed 0 on an idle 2-core
# CPU); then the broad check (~9 min).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=shapes_long.yaml IMAGES=2 exec bash scripts/shapes_default_check.sh "${1:-runs/shapes_long_check}"
