#!/usr/bin/env bash
# actprune container entrypoint: turn environment variables into one `actprune serve` command.
#
#   MODEL                        Hugging Face id or a directory (e.g. /workspace/pruned); required
#   VLLM_API_KEY                 API key; vLLM reads it from the environment (never put on argv)
#   TENSOR_PARALLEL_SIZE         GPUs per server (default 1)
#   CAPTURE                      1: capture activation statistics (default), 0: plain vLLM
#   ACTPRUNE_SNAPSHOT_DIR        snapshot directory (default /workspace/actprune, the pod volume)
#   ACTPRUNE_SNAPSHOT_INTERVAL   seconds between snapshots, 0 disables (default 60)
#   PORT                         HTTP port (default 8000); HOST: bind address (default 0.0.0.0)
#   ACTPRUNE_ALLOW_NO_KEY        1: serve on HOST without an API key; otherwise `actprune serve`
#                                refuses a non-loopback HOST without VLLM_API_KEY
#   EXTRA_VLLM_ARGS              more `vllm serve` arguments, shell-quoted, e.g.
#                                "--max-model-len 8192 --gpu-memory-utilization 0.92"
#
# The command is logged without EXTRA_VLLM_ARGS (only how many words it adds) and with the
# value of any --api-key replaced by ***: pod logs are read by more people than the key is.
# Arguments given to the container (`docker run IMAGE --foo`) are appended after
# EXTRA_VLLM_ARGS. A first argument that is not a flag is run instead of the server
# (`docker run IMAGE sleep infinity`, or RunPod's start command): a pod for pruning and
# fine-tuning with the GPU free. A bad value stops the container with one line naming the variable.
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

die() {
    echo "actprune entrypoint: error: $*" >&2
    exit 2
}

positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

[[ -n "${MODEL:-}" ]] || die "MODEL is not set; set it to a Hugging Face id (Qwen/Qwen3-32B) or a directory under /workspace"

TENSOR_PARALLEL_SIZE="${TENSOR_PARALLEL_SIZE:-1}"
positive_int TENSOR_PARALLEL_SIZE "$TENSOR_PARALLEL_SIZE"
PORT="${PORT:-8000}"
positive_int PORT "$PORT"
((PORT <= 65535)) || die "PORT must be at most 65535, got '$PORT'"
HOST="${HOST:-0.0.0.0}"
CAPTURE="${CAPTURE:-1}"
[[ "$CAPTURE" == 0 || "$CAPTURE" == 1 ]] || die "CAPTURE must be 1 (capture statistics) or 0 (plain vLLM), got '$CAPTURE'"

args=("$MODEL" --host "$HOST" --port "$PORT" --tensor-parallel-size "$TENSOR_PARALLEL_SIZE")

if [[ "$CAPTURE" == 1 ]]; then
    snapshot_dir="${ACTPRUNE_SNAPSHOT_DIR:-/workspace/actprune}"
    interval="${ACTPRUNE_SNAPSHOT_INTERVAL:-60}"
    [[ "$interval" =~ ^[0-9]+([.][0-9]+)?$ ]] \
        || die "ACTPRUNE_SNAPSHOT_INTERVAL must be a number of seconds >= 0, got '$interval'"
    mkdir -p "$snapshot_dir" 2>/dev/null && [[ -w "$snapshot_dir" ]] \
        || die "ACTPRUNE_SNAPSHOT_DIR '$snapshot_dir' is not writable; mount the pod volume at /workspace or choose another directory"
    args+=(--snapshot-dir "$snapshot_dir" --snapshot-interval "$interval")
else
    args+=(--no-capture)
fi

# Split EXTRA_VLLM_ARGS like a shell would (quotes honoured, nothing executed).
split_words='
import shlex, sys
try:
    words = shlex.split(sys.argv[1])
except ValueError as e:
    sys.exit(f"actprune entrypoint: error: EXTRA_VLLM_ARGS: {e} (value not shown)")
sys.stdout.write("".join(w + "\0" for w in words))
'
extra=()
if [[ -n "${EXTRA_VLLM_ARGS:-}" ]]; then
    "${PYTHON:-python3}" -c "$split_words" "$EXTRA_VLLM_ARGS" >/dev/null || exit 2
    mapfile -d '' extra < <("${PYTHON:-python3}" -c "$split_words" "$EXTRA_VLLM_ARGS")
fi

redacted() {  # WORDS...: the words, with the values of --api-key (one or more, or =VALUE) as ***
    local out=() hide=0 w
    for w in "$@"; do
        [[ "$w" == -* ]] && hide=0
        if ((hide)); then
            out+=("***")
        elif [[ "$w" == --api-key ]]; then
            out+=("$w")
            hide=1
        elif [[ "$w" == --api-key=* ]]; then
            out+=("--api-key=***")
        else
            out+=("$w")
        fi
    done
    echo "${out[*]}"
}

shown="$(redacted "${args[@]}" "$@")"
((${#extra[@]} == 0)) || shown+=" (+ ${#extra[@]} words of EXTRA_VLLM_ARGS, not shown)"
echo "actprune entrypoint: actprune serve $shown" >&2
exec actprune serve "${args[@]}" "${extra[@]}" "$@"
