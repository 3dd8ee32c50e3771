#!/usr/bin/env bash
# Pretrain the shapes-world model on one GPU, self-timed, everything written under $OUT.
#
# Runs on the lent GPU machine (Python 3.12, torch + transformers preinstalled, no diffusers, no
# internet) from the repository root, with wheels/ carried over (scripts/fetch_wheels.sh makes it):
#     bash scripts/gpu_pretrain.sh
# Training stops by wall clock after MAX_MIN minutes (evals included); snapshots + evals at the
# MILESTONES steps land in $OUT/pretrain/step_N/ and $OUT/pretrain/eval.jsonl, and
# $OUT/summary.json names the snapshot whose binding_val_pair is in [0.2, 0.6] with the best singles.
# Each snapshot step_N is reproducible with `diffloop shapes pretrain` and the same arguments
# (recorded in $OUT/pretrain/config.json) and --steps N: the LR schedule is constant after warmup.
#
# Overrides (env): OUT, MAX_MIN (5), BATCH (512), LR (1.5e-3), DEVICE (cuda), WORKERS (auto),
# MILESTONES, SKIP_INSTALL=1 (local smoke test), EXTRA_ARGS (appended to the pretrain command).
set -uo pipefail
T0=$(date +%s)
OUT="${OUT:-runs/gpu_pretrain}"
MAX_MIN="${MAX_MIN:-5}"
BATCH="${BATCH:-512}"
LR="${LR:-1.5e-3}"
DEVICE="${DEVICE:-cuda}"
MILESTONES="${MILESTONES:-250,500,1000,1500,2000,3000,4000,5000,6500,8000,10000,12500,15000,20000,25000,30000}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_pretrain.log") 2>&1
echo "[gpu_pretrain] start $(date -u +%FT%TZ) OUT=$OUT MAX_MIN=$MAX_MIN BATCH=$BATCH LR=$LR DEVICE=$DEVICE"

SITE="$PWD/.gpu_site"  # fallback install target if the system site-packages refuses (PEP 668)
install() {  # install() WHEEL...: offline, no dependency resolution
    pip install -q --no-index --no-deps "$@" 2>/dev/null \
        || pip install -q --no-index --no-deps --target "$SITE" "$@" \
        || echo "[gpu_pretrain] WARNING: could not install $*"
}
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    # diffusers (and peft/accelerate) from the carried wheels; import-time deps only where missing.
    install wheels/diffusers-*.whl wheels/peft-*.whl wheels/accelerate-*.whl
    for mod in requests filelock importlib_metadata; do
        PYTHONPATH="$SITE" python -c "import $mod" 2>/dev/null && continue
        case $mod in
            requests) install wheels/requests-*.whl wheels/urllib3-*.whl wheels/idna-*.whl \
                wheels/certifi-*.whl wheels/charset_normalizer-*.whl ;;
            importlib_metadata) install wheels/importlib_metadata-*.whl wheels/zipp-*.whl ;;
            *) install wheels/$mod-*.whl ;;
        esac
    done
    # The `diffloop` console script; without build isolation (no internet for setuptools). The
    # run itself uses PYTHONPATH=src, so a failure here costs nothing.
    pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || echo "[gpu_pretrain] editable install failed; using PYTHONPATH=src"
fi
[[ -d "$SITE" ]] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

# The wall clock left for training: MAX_MIN minus what installing took; a hard timeout 2 min later.
SPENT=$(( $(date +%s) - T0 ))
TRAIN_MIN=$(python -c "print(max(0.5, $MAX_MIN - $SPENT / 60))")
echo "[gpu_pretrain] setup took ${SPENT}s; training for ${TRAIN_MIN} min"
timeout $(python -c "print(int($TRAIN_MIN * 60 + 120))") python -m diffloop.shapes.pretrain \
    --output "$OUT/pretrain" --device "$DEVICE" --seed 0 \
    --steps 100000 --max-minutes "$TRAIN_MIN" --batch-size "$BATCH" --lr "$LR" \
    --warmup-steps 250 --schedule constant --ema-decay 0.999 --cond-dropout 0.1 \
    --milestones "$MILESTONES" --eval-max-prompts 0 --eval-images-per-prompt 1 \
    --eval-steps 10 --eval-guidance 3.0 --eval-eta 1.0 --eval-batch-size 512 \
    --log-every 100 ${WORKERS:+--num-workers "$WORKERS"} ${EXTRA_ARGS:-}
echo "[gpu_pretrain] pretrain exit status $?"

# Pick a snapshot: binding_val_pair in [0.2, 0.6], then the best singles, then the latest step.
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
path = out / "pretrain" / "eval.jsonl"
evals = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
for e in evals:
    print(f"step {e['step']:6d} loss {e['loss']:.4f} val_pair {e['binding_val_pair']:.3f} "
          f"val_unseen {e['binding_val_unseen']:.3f} val_seen {e['binding_val_seen']:.3f} "
          f"train_single {e['binding_train_single']:.3f} train_pair {e['binding_train_pair']:.3f}")
def snapshot(step):
    """The saved model directory of an evaluated step: step_N/, or final/ if it stopped there."""
    if (out / "pretrain" / f"step_{step}").is_dir():
        return f"pretrain/step_{step}"
    info = out / "pretrain" / "final" / "diffloop_model.json"
    if info.exists() and json.loads(info.read_text())["pretrain"]["step"] == step:
        return "pretrain/final"
    return None
ok = [e for e in evals if 0.2 <= e["binding_val_pair"] <= 0.6 and snapshot(e["step"])]
pick = max(ok, key=lambda e: (round(e["binding_train_single"], 2), e["step"])) if ok else None
summary = {"picked": pick and snapshot(pick["step"]), "picked_eval": pick, "evals": evals}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print("[gpu_pretrain] picked:", summary["picked"], pick)
PY
echo "[gpu_pretrain] done in $(( $(date +%s) - T0 ))s"
