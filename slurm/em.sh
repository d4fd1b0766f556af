#!/usr/bin/env bash
# Submit BoLT EM iterations to SLURM as one chain of jobs linked by --dependency (docs/slurm.md).
#
#   slurm/em.sh --run-dir DIR --config TRAIN.yaml --start-ckpt CKPT --chunks CHUNKS.zarr \
#       --samples K [--tokenizer DIR] [--iterations N] [--first-iteration I] [--shards S] [--extra-data W:PREFIX ...]
#       [--base-ckpt CKPT] [--merge-args "..."] [--estep-args "..."] [--dry-run] [-- key=value ...]
#
# Iteration n, each job in DIR/iter<n>/ (logs in DIR/logs/):
#   export  bolt convert mcore-to-hf of the previous checkpoint    (afterok: previous train)
#   fleet   slurm/fleet.sbatch serving that export                 (afterok: export)
#   estep   slurm/estep.sbatch, an array of S shards               (after: fleet has started)
#   stop    scancel --batch --signal=USR2 FLEET: the fleet exits 0 (afterany: estep)
#   merge   bolt merge of the chosen latents                       (afterok: estep)
#   train   slurm/train.sbatch CONFIG with the merged data,        (afterok: merge)
#           starting from the previous weights (checkpoint.load, checkpoint.finetune=true), or with
#           --base-ckpt from CKPT every time (the paper: each iteration restarts from the base model)
# The E-step of iteration n always uses the model of iteration n-1 (n = first: --start-ckpt).
# --tokenizer is copied into each export (default: the checkpoint's own tokenizer/ directory).
# Relative paths are relative to DIR. Job ids are printed as `name id`; --dry-run prints the sbatch
# commands instead (ids shown as <name>). Extra sbatch options per kind of job come from the
# variables TRAIN_SBATCH, FLEET_SBATCH, ESTEP_SBATCH, STEP_SBATCH (e.g. "--partition=gpu --nodes=4");
# every other variable (CONTAINER_IMAGE, FLEET_ENGINE, BOLT, PYTHON, ...) reaches the jobs as is.
set -euo pipefail

die() { echo "error: em.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run_dir= config= start_ckpt= base_ckpt= chunks= samples= tokenizer= iterations=1 first=1 shards=8 dry=0
merge_args= estep_args=
extra=()
overrides=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --run-dir) run_dir=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --start-ckpt) start_ckpt=$2; shift 2 ;;
        --base-ckpt) base_ckpt=$2; shift 2 ;;
        --chunks) chunks=$2; shift 2 ;;
        --samples) samples=$2; shift 2 ;;
        --tokenizer) tokenizer=$2; shift 2 ;;
        --iterations) iterations=$2; shift 2 ;;
        --first-iteration) first=$2; shift 2 ;;
        --shards) shards=$2; shift 2 ;;
        --extra-data) extra+=("$2"); shift 2 ;;
        --merge-args) merge_args=$2; shift 2 ;;
        --estep-args) estep_args=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; overrides=("$@"); break ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
for name in run_dir config start_ckpt chunks samples; do
    [[ -n ${!name} ]] || die "--${name//_/-} is required (see --help)"
done
for item in "${overrides[@]}"; do
    [[ $item == *=* ]] || die "arguments after -- are training overrides key=value, not '$item' (options go before --)"
done
for name in iterations first shards samples; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "--${name//_/-} must be a positive integer, not '${!name}'"
done
[[ -d $run_dir ]] || die "run directory not found: $run_dir"
run_dir=$(cd "$run_dir" && pwd)
cd "$run_dir"  # relative paths below are relative to the run directory, as inside the jobs
[[ -f $config ]] || die "training config not found: $config (relative to $run_dir)"
[[ -e $chunks ]] || die "chunk store not found: $chunks (relative to $run_dir)"
[[ $dry -eq 1 || -e $start_ckpt/latest_checkpointed_iteration.txt ]] ||
    die "no checkpoint in $start_ckpt (latest_checkpointed_iteration.txt missing)"
[[ $dry -eq 1 || -z $base_ckpt || -e $base_ckpt/latest_checkpointed_iteration.txt ]] ||
    die "no checkpoint in --base-ckpt $base_ckpt (latest_checkpointed_iteration.txt missing)"
[[ $dry -eq 1 ]] || mkdir -p logs

export BOLT_SLURM_DIR=$SLURM_DIR RUN_DIR=$run_dir

# submit NAME DEPENDENCY VAR=VALUE... -- SBATCH ARGS...: prints/records the job id in $job
submit() {
    local name=$1 dep=$2
    shift 2
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    local cmd=(env "${envs[@]}" sbatch --parsable --chdir="$run_dir")
    [[ -n $dep ]] && cmd+=(--dependency="$dep")
    cmd+=("$@")
    if [[ $dry -eq 1 ]]; then
        # shell-quoted, except the <name> placeholders of jobs that were not submitted
        printf '%q ' "${cmd[@]}" | sed -e 's/ $//' -e 's/\\<\([a-z0-9-]*\)\\>/<\1>/g'
        echo
        job="<$name>"
    else
        job=$("${cmd[@]}") || die "sbatch failed for $name: ${cmd[*]}"
        job=${job%%;*}
        echo "$name $job"
    fi
}

# shellcheck disable=SC2206  # the *_SBATCH variables are lists of options
train_opts=(${TRAIN_SBATCH:-}) fleet_opts=(${FLEET_SBATCH:-}) estep_opts=(${ESTEP_SBATCH:-}) step_opts=(${STEP_SBATCH:-})
# shellcheck disable=SC2206
merge_extra=($merge_args) estep_extra=($estep_args)
tokenizer_arg=()
if [[ -n $tokenizer ]]; then
    [[ -e $tokenizer ]] || die "tokenizer not found: $tokenizer (relative to $run_dir)"
    tokenizer_arg=(--tokenizer "$tokenizer")
fi
previous_ckpt=$start_ckpt
previous_train=
for ((n = first; n < first + iterations; n++)); do
    it=iter$n
    [[ $dry -eq 1 ]] || mkdir -p "$it/data"
    dep=${previous_train:+afterok:$previous_train}
    submit "$it-export" "$dep" SKIP_IF_EXISTS="$it/model_hf" -- "${step_opts[@]}" --job-name=bolt-export \
        "$SLURM_DIR/bolt.sbatch" convert mcore-to-hf --ckpt "$previous_ckpt" --out "$it/model_hf" "${tokenizer_arg[@]}"
    export_job=$job
    submit "$it-fleet" "afterok:$export_job" MODEL="$it/model_hf" URLFILE="$it/router_url" -- \
        "${fleet_opts[@]}" "$SLURM_DIR/fleet.sbatch"
    fleet_job=$job
    submit "$it-estep" "afterok:$export_job,after:$fleet_job" MODEL="$it/model_hf" CHUNKS="$chunks" \
        OUT="$it/latents.zarr" SAMPLES="$samples" URLFILE="$it/router_url" SHARDS="$shards" FLEET_JOB="$fleet_job" -- \
        --array="0-$((shards - 1))" "${estep_opts[@]}" "$SLURM_DIR/estep.sbatch" "${estep_extra[@]}"
    estep_job=$job
    submit "$it-stop" "afterany:$estep_job" -- "${step_opts[@]}" --job-name=bolt-fleet-stop \
        --output=logs/%x-%j.out --ntasks=1 --cpus-per-task=1 \
        --wrap="scancel --batch --signal=USR2 $fleet_job; scancel --state=PENDING $fleet_job; true"
    submit "$it-merge" "afterok:$estep_job" -- "${step_opts[@]}" --job-name=bolt-merge \
        "$SLURM_DIR/bolt.sbatch" merge --chunks "$chunks" --latents "$it/latents.zarr" \
        --output-prefix "$it/data/ltm" --quiet "${merge_extra[@]}"
    merge_job=$job
    blend=
    for item in "${extra[@]}"; do
        [[ $item == *:* ]] || die "--extra-data takes WEIGHT:PREFIX, not $item"
        blend+="${item%%:*},\"${item#*:}\","
    done
    if [[ -n $blend ]]; then blend="[${blend}1,\"$it/data/ltm_text_document\"]"; else blend="[\"$it/data/ltm_text_document\"]"; fi
    submit "$it-train" "afterok:$merge_job" -- "${train_opts[@]}" "$SLURM_DIR/train.sbatch" "$config" \
        "output_dir=$it/train" "checkpoint.dir=$it/checkpoints" "data.prefixes=$blend" "data.split=100,0,0" \
        "checkpoint.load=${base_ckpt:-$previous_ckpt}" "checkpoint.finetune=true" "${overrides[@]}"
    previous_train=$job
    previous_ckpt=$it/checkpoints
done
