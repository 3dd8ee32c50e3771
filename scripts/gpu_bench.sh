#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command (about 8 minutes on an H100/H200):
#   bash scripts/fetch_wheels.sh wheels    # once, where the package index is reachable: diffusers/peft
#                                          # wheels for a GPU machine without it (copy wheels/ along)
#   bash scripts/gpu_bench.sh
# Writes $OUT/bench_{sd15,sdxl,sd35,flux,flux2_klein,flux2,qwen_image,zimage}.{json,txt};
# docs/performance.md reads them. Each JSON's memory_plan holds the memory plan's peak per phase
# beside torch.cuda.max_memory_allocated (docs/performance.md, "Memory plan vs measured").
# FLUX.2-dev (a 32e9-parameter transformer, 64 GB in bf16) needs a 141 GB GPU to train.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ! python -c "import diffusers, peft" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps wheels/diffusers-*.whl wheels/peft-*.whl
fi
export HF_HUB_OFFLINE=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# SD1.5 shape, DDPO's settings (50 steps, CFG 5, sample batch 16, train batch 4): each variant on a
# fresh policy, the first the baseline; the time limit keeps whatever finished.
python -m diffloop.tools.bench --shape sd15 --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --variants "${VARIANTS:-eager,fast,compile_all,low_memory,channels_last,eager_attention}" \
    --time-limit-s "${SD15_LIMIT_S:-300}" --output "$OUT/bench_sd15.json" | tee "$OUT/bench_sd15.txt"
python -m diffloop.tools.bench --shape sdxl --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --time-limit-s "${SDXL_LIMIT_S:-90}" --output "$OUT/bench_sdxl.json" | tee "$OUT/bench_sdxl.txt"
# The flow-matching transformers through their policies (random weights from the real configs).
python -m diffloop.tools.bench --shape sd35 --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --time-limit-s "${SD35_LIMIT_S:-60}" --output "$OUT/bench_sd35.json" | tee "$OUT/bench_sd35.txt"
python -m diffloop.tools.bench --shape flux --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --time-limit-s "${FLUX_LIMIT_S:-60}" --output "$OUT/bench_flux.json" | tee "$OUT/bench_flux.txt"
python -m diffloop.tools.bench --shape flux2_klein --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --guidance-scale 4 --time-limit-s "${FLUX2_KLEIN_LIMIT_S:-60}" \
    --output "$OUT/bench_flux2_klein.json" | tee "$OUT/bench_flux2_klein.txt"
python -m diffloop.tools.bench --shape flux2 --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --guidance-scale 4 --gradient-checkpointing --time-limit-s "${FLUX2_LIMIT_S:-90}" \
    --output "$OUT/bench_flux2.json" | tee "$OUT/bench_flux2.txt"
python -m diffloop.tools.bench --shape qwen_image --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --gradient-checkpointing --time-limit-s "${QWEN_IMAGE_LIMIT_S:-120}" \
    --output "$OUT/bench_qwen_image.json" | tee "$OUT/bench_qwen_image.txt"
python -m diffloop.tools.bench --shape zimage --device cuda --dtype bf16 --repeats 2 --warmup 1 \
    --gradient-checkpointing --time-limit-s "${ZIMAGE_LIMIT_S:-120}" \
    --output "$OUT/bench_zimage.json" | tee "$OUT/bench_zimage.txt"
