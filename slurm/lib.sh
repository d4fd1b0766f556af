# Helpers shared by the sbatch scripts in slurm/ (sourced, not run). See docs/slurm.md.
#
# Variables every script understands:
#   RUN_DIR          the run directory: the job cds there, relative paths are relative to it
#                    (default: the job's working directory: sbatch --chdir, else where sbatch ran)
#   BOLT             how to call megatron-bolt (default: `bolt` if on PATH, else `python3 -m megatron_bolt`)
#   PYTHON           the Python that has megatron-bolt and sglang-router (default: python3)
#   CONTAINER_IMAGE  run srun steps inside this pyxis/enroot image (e.g. nvcr.io#nvidia/pytorch:25.01-py3)
#   CONTAINER_MOUNTS pyxis --container-mounts (default: RUN_DIR and the repository, same paths inside)

die() {
    echo "error: ${BOLT_SCRIPT:-slurm}: $*" >&2
    exit 2
}

log() {
    echo "[$(date -u +%H:%M:%S) ${BOLT_SCRIPT:-slurm} job ${SLURM_JOB_ID:-none}] $*"
}

require_vars() {  # require_vars NAME...: each must be set and non-empty
    local name
    for name in "$@"; do
        [[ -n ${!name:-} ]] || die "variable $name is not set (see the header of $BOLT_SCRIPT or docs/slurm.md)"
    done
}

require_path() {  # require_path PATH WHAT: PATH (relative to RUN_DIR) must exist
    [[ -e $1 ]] || die "$2 not found: $1 (relative paths are relative to RUN_DIR=$PWD)"
}

# Called first by every script: cd to RUN_DIR, create logs/, set up BOLT / PYTHON / container flags.
bolt_setup() {
    BOLT_SCRIPT=$1
    RUN_DIR=${RUN_DIR:-$PWD}  # a batch job starts in its working directory (--chdir)
    [[ -d $RUN_DIR ]] || die "RUN_DIR is not a directory: $RUN_DIR"
    cd "$RUN_DIR"
    RUN_DIR=$PWD
    mkdir -p logs
    PYTHON=${PYTHON:-python3}
    if [[ -z ${BOLT:-} ]]; then
        if command -v bolt >/dev/null; then BOLT=bolt; else BOLT="$PYTHON -m megatron_bolt"; fi
    fi
    read -r -a BOLT_CMD <<<"$BOLT"
    # CONTAINER_FLAGS go on srun lines; IN_CONTAINER prefixes a command that would otherwise run in
    # the batch shell (a one-task step in the image), and is empty without an image.
    CONTAINER_FLAGS=() IN_CONTAINER=()
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        CONTAINER_FLAGS=(--container-image="$CONTAINER_IMAGE" --container-workdir="$RUN_DIR"
            --container-mounts="${CONTAINER_MOUNTS:-$RUN_DIR:$RUN_DIR,$BOLT_SLURM_DIR/..:$BOLT_SLURM_DIR/..}")
        IN_CONTAINER=(srun --nodes=1 --ntasks=1 --overlap "${CONTAINER_FLAGS[@]}")
    fi
    export RUN_DIR BOLT PYTHON BOLT_SLURM_DIR
}

# Health checks run on the batch host, outside any container: the system python3's stdlib suffices.
http_ok() {  # http_ok URL [TIMEOUT_S]: GET succeeds with 200 (no curl needed)
    python3 - "$1" "${2:-3}" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

generate_ok() {  # generate_ok URL: the server (or router) answers a one-token native /generate
    python3 - "$1" <<'EOF' >/dev/null 2>&1
import json, sys, urllib.request
body = json.dumps({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}).encode()
req = urllib.request.Request(sys.argv[1] + "/generate", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=30) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll COMMAND every 2 s; die after SECONDS
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after $1 s waiting for $what"
        sleep 2
    done
}

write_atomic() {  # write_atomic FILE TEXT: readers never see a half-written file
    printf '%s\n' "$2" >"$1.tmp.$$"
    mv -f "$1.tmp.$$" "$1"
}

# One fleet worker; runs as one srun task (SLURM_LOCALID picks its port and GPU).
# DETERMINISTIC=1 (the default) starts it with --enable-deterministic-inference: SGLang (and
# `bolt serve`, which copies it) honours a request's sampling_seed only with that flag.
fleet_worker() {
    local port=$((FLEET_PORT + 1 + SLURM_LOCALID)) det=()
    case ${DETERMINISTIC:-1} in
        1) det=(--enable-deterministic-inference) ;;
        0) ;;
        *) die "DETERMINISTIC must be 1 or 0, not $DETERMINISTIC" ;;
    esac
    if [[ $FLEET_ENGINE == sglang ]]; then
        local per=${GPUS_PER_WORKER:-1} all first
        IFS=, read -r -a all <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 63)}"
        first=$((SLURM_LOCALID * per))
        ((${#all[@]} > per)) || first=0  # SLURM already bound this task to its own GPUs
        CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${all[*]:first:per}")
        export CUDA_VISIBLE_DEVICES
        # shellcheck disable=SC2086  # SGLANG_ARGS is a list of flags
        exec "$PYTHON" -m sglang.launch_server --model-path "$MODEL" --host 0.0.0.0 --port "$port" \
            --tp-size "$per" "${det[@]}" ${SGLANG_ARGS:-}
    fi
    exec "${BOLT_CMD[@]}" serve --model "$MODEL" --host 0.0.0.0 --port "$port" --threads "${SLURM_CPUS_PER_TASK:-1}" \
        "${det[@]}"
}
