#!/usr/bin/env bash
# Regenerates docs/results.md (and docs/results/*.png) from the shapes_algorithms sweep and two
# gradient-variance measurements. Everything is resumable: rerun after an interruption and finished
# runs are skipped.
#
#   scripts/make_results.sh [key.sub=value ...]      # overrides for every sweep run, e.g. sample.batch_size=64
#
# Environment: SWEEP (default shapes_algorithms.yaml, a path or a packaged sweep), RUNS (its output
# directory, default runs/shapes_algorithms), VAR_ESTIMATES (independent gradient estimates per
# estimator, default 64), VAR_PROMPTS (prompts per estimate, default 4), VAR_ALGORITHMS (default
# without reinforce_loo: at the on-policy point its estimator is loop's, term for term), VAR_TRAINED=1
# (also measure at the trained loop_k4 seed-0 parameters), VAR_OVERRIDES (space-separated key=value for
# the variance measurements), SHARDS (N sweep processes in parallel, balanced by reward queries),
# TRAIN=0 (no training: summarise the finished runs, e.g. after stopping a sweep early), BROAD=0
# (no broad check, step 3), BROAD_IMAGES (images per prompt, default 2), BROAD_SEED (default 777),
# PYTHON.
# Cost on this project's 2-core CPU (OMP_NUM_THREADS=1, SHARDS=2, VAR_ESTIMATES=32): the 48 runs of
# 8 seeds took 3 h 54 min (seeds 0-4: 2 h 17 min; seeds 5-7: 1 h 37 min), about 9 min a run on its
# own core (6 min training, 3 min for the 5 held-out evaluations; part of the time other processes
# shared the cores); the two variance measurements side by side ~20 min; the broad check (step 3,
# 48 runs + the base x 632 images) 63 min in 2 parts; minutes on one GPU.
# On a shared CPU set OMP_NUM_THREADS=1:
# oversubscribed OpenMP threads are 10-40x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PYTHON=${PYTHON:-python}
SWEEP=${SWEEP:-shapes_algorithms.yaml}
RUNS=${RUNS:-runs/shapes_algorithms}
VAR_ESTIMATES=${VAR_ESTIMATES:-64}
VAR_PROMPTS=${VAR_PROMPTS:-4}
VAR_ALGORITHMS=${VAR_ALGORITHMS:-loop@2,loop@4,grpo@4,ppo@1,reinforce@1}
VAR_TRAINED=${VAR_TRAINED:-0}
TRAINED_RUN="$RUNS/loop_k4/seed_0"   # the parameters of the second variance measurement

SHARDS=${SHARDS:-1}
compare() { "$PYTHON" -m diffloop compare "$@"; }
variance() { "$PYTHON" -m diffloop variance "$@"; }

# 1. The sweep (skips finished runs, resumes unfinished ones) and its summary.
if [ "${TRAIN:-1}" = 0 ]; then  # write the documents from the runs that exist, train nothing
    compare "$SWEEP" --output-dir "$RUNS" --summary-only "$@"
elif [ "$SHARDS" -gt 1 ]; then
    mkdir -p "$RUNS"
    pids=()
    for ((i = 0; i < SHARDS; i++)); do
        compare "$SWEEP" --output-dir "$RUNS" --shard "$i/$SHARDS" "$@" > "$RUNS/shard_$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed shard stops the script here
    compare "$SWEEP" --output-dir "$RUNS" --summary-only "$@"
else
    compare "$SWEEP" --output-dir "$RUNS" "$@"
fi

# 2. Gradient variance at the initial parameters and at the trained loop_k4 (seed 0) parameters.
# shellcheck disable=SC2206  # VAR_OVERRIDES is a space-separated list on purpose
var_args=(--algorithms "$VAR_ALGORITHMS" --estimates "$VAR_ESTIMATES" "sample.prompts_per_epoch=$VAR_PROMPTS" ${VAR_OVERRIDES:-})
# With SHARDS > 1 the two measurements run side by side (one process each), else one after the other.
var_pids=()
if [ ! -f "$RUNS/variance_init.json" ]; then
    variance "${var_args[@]}" --output "$RUNS/variance_init.json" > "$RUNS/variance_init.log" 2>&1 &
    var_pids+=($!)
    [ "$SHARDS" -gt 1 ] || { wait "${var_pids[0]}"; var_pids=(); }
fi
if [ "$VAR_TRAINED" = 1 ] && [ ! -f "$RUNS/variance_trained.json" ]; then
    variance "$TRAINED_RUN/config.yaml" "${var_args[@]}" --from-run "$TRAINED_RUN" \
        --output "$RUNS/variance_trained.json" > "$RUNS/variance_trained.log" 2>&1 &
    var_pids+=($!)
fi
for pid in "${var_pids[@]}"; do wait "$pid"; done  # set -e: a failed measurement stops the script here

# 3. The broad check: the base model and every finished run rescored on all val_pair prompts x
# BROAD_IMAGES with noise seed BROAD_SEED (the runs' own evaluation: 96 prompts, other noise). The
# runs are split into SHARDS parts of consecutive seeds (scripts/broad_parts.py), one `diffloop eval`
# process each; a part whose eval.json already lists exactly its targets is kept (adding seeds
# regroups them, so it reruns).
BROAD=${BROAD:-1}
BROAD_IMAGES=${BROAD_IMAGES:-2}
BROAD_SEED=${BROAD_SEED:-777}
broad_args=()
if [ "$BROAD" = 1 ]; then
    part=0
    broad_pids=()
    while read -r -a targets; do
        dir="$RUNS/broad_eval/part_$part"
        broad_args+=("$dir/eval.json")
        if ! "$PYTHON" scripts/broad_parts.py done "$dir/eval.json" "${targets[@]}"; then
            rm -rf "$dir" && mkdir -p "$dir"
            "$PYTHON" -m diffloop eval shapes --compare "${targets[@]}" --prompts shapes/val_pair \
                --reward shapes_binding --images-per-prompt "$BROAD_IMAGES" --steps 10 \
                --guidance-scale 3.0 --eta 1.0 --seed "$BROAD_SEED" --batch-size 32 \
                --output "$dir" > "$dir.log" 2>&1 &
            broad_pids+=($!)
        fi
        part=$((part + 1))
    done < <("$PYTHON" scripts/broad_parts.py plan "$RUNS" "$SHARDS")
    for pid in "${broad_pids[@]}"; do wait "$pid"; done  # set -e: a failed part stops the script here
    broad_args=(--broad "${broad_args[@]}")
fi

# 4. docs/results.md from the pieces.
mkdir -p docs/results
cp "$RUNS"/eval_vs_*.png docs/results/
device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    echo "# Results: the algorithms of docs/method.md on the shapes world"
    echo
    echo "Generated by \`${MAKE_RESULTS_COMMAND:-scripts/make_results.sh}\` on $(date -u +%Y-%m-%d) at commit"
    echo "$commit ($device); do not edit by hand. Sweep: \`$SWEEP\` (\`diffloop compare $SWEEP --dry-run\`"
    echo "lists the grid)."
    echo
    echo "Wall-clock figures are per run, measured while $SHARDS sweep process(es) shared the machine"
    echo "($(getconf _NPROCESSORS_ONLN 2>/dev/null || echo "?") cores); with several processes per core they include contention."
    echo
    cat <<'NOTES'
How to read the comparison. Every run queries the reward 768 times: 12 epochs of 64 samples, drawn
as 16 prompts x K = 4 (loop_k4, grpo_k4, reinforce_loo_k4: the same 192 training prompts), 32 x 2
(loop_k2: 384 prompts) or 64 x 1 (ppo_k1, reinforce_k1: 768 prompts), from the shapes world's
training pairs. loop, grpo and ppo make 2 clipped updates of 32 samples per epoch (24 optimizer
steps), reinforce and reinforce_loo one score-function step on the epoch's 64 (12 steps). Every run
is evaluated on the same 96 held-out pair prompts x 2 images with fixed noise (seen and unseen
attribute-object combinations), scored by the product binding reward; everything else is
`configs/shapes.yaml` (LoRA r8, lr 3e-3, the [0, 5) timestep window, clip 1e-4 on mean-reduced
log-probs, trained on the phrase-mean binding reward). So the K = 4 comparisons are at equal prompts
AND equal reward queries; the comparisons with loop_k2 and the K = 1 runs are at equal reward queries,
where the smaller K sees more distinct prompts. The second update of an epoch is off-policy, so the
clip can act for loop, grpo and ppo.

Every trained model is scored twice: by its run's own evaluation (the curves and the first table
below) and by the broad check at the end (all 316 val_pair prompts x 2 images, other noise: 3.3x
the images). The broad check's table says how much of each difference's seed-to-seed spread is
evaluation noise; where the two are close, more images (BROAD_IMAGES) tighten it more than seeds.

NOTES
    echo
    "$PYTHON" -m diffloop.tools.claims "$RUNS/summary.json" "$RUNS/variance_init.json" "$RUNS" "${broad_args[@]}"
    echo
    echo "## Held-out reward at a matched budget"
    echo
    tail -n +2 "$RUNS/summary.md" | sed 's|](eval_vs_|](results/eval_vs_|g'
    echo
    echo "## Gradient variance (Proposition 4.1 of the LOOP paper)"
    echo
    echo "At fixed parameters, independent batches drawn under each estimator's own sampling scheme"
    echo "(\`diffloop variance\`; the method is described in \`src/diffloop/tools/variance.py\`)."
    echo
    echo "### At the initial parameters"
    echo
    cat "$RUNS/variance_init.md"
    echo
    if [ -f "$RUNS/variance_trained.md" ]; then
        echo
        echo "### At the end of training (loop_k4, seed 0)"
        echo
        cat "$RUNS/variance_trained.md"
    fi
} > docs/results.md
echo "wrote docs/results.md"
