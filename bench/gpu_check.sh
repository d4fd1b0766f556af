#!/usr/bin/env bash
# The GPU path end to end, on one GPU, offline, in under 8 minutes on an H100/H200:
#   install  megatron-core and the other missing dependencies from a folder of wheels (no network)
#   train    a TinyLlama-shaped model (22 layers, d 2048, 32 heads / 4 KV, ffn 5632, seq 2048,
#            vocab 32000) in bf16 with the distributed optimizer for 30 steps; prints tokens/s,
#            MFU and peak memory from metrics.jsonl
#   resume   from the step-25 checkpoint; steps 26-30 must reproduce the first run's losses
#   convert  the resumed run's HF export (`bolt train --export-hf`: its rank 0 converts as
#            `bolt convert mcore-to-hf` does), then `bolt score` against transformers on the same device
#
# Usage:
#   bench/gpu_check.sh --wheels DIR [--workdir DIR] [--python PY]     the GPU check
#   bench/gpu_check.sh --cpu-smoke  [--workdir DIR] [--python PY]     the same steps, tiny shapes, CPU
#
# DIR holds .whl files for Python 3.12 (megatron-core 0.16.1 cp312 and the project's other
# requirements; docs/benchmarks.md shows how to fill it). A wheel whose distribution is already
# installed is skipped, and torch/triton/nvidia-* wheels always are, so the image's CUDA torch stays.
# Wheels go into a venv (WORKDIR/venv, --system-site-packages) when `python -m venv` works, else
# into the user site. Each check prints a `gpu_check:` line; the script exits non-zero on the first failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="" WORK="" SMOKE=0 PY="${PYTHON:-python3}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --workdir) WORK="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed -E 's/^# ?//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $SMOKE == 0 && -z "$WHEELS" ]] && ! "$PY" -c "import megatron.core" 2>/dev/null; then
  echo "gpu_check.sh: megatron-core is not importable; pass --wheels DIR (see docs/benchmarks.md)" >&2; exit 2
fi
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK"
START=$(date +%s)
phase() { echo "gpu_check: [$(( $(date +%s) - START ))s] $*"; }

# ---------------------------------------------------------------- install (offline)
if [[ -n "$WHEELS" ]]; then
  [[ -d "$WHEELS" ]] || { echo "gpu_check.sh: --wheels $WHEELS: not a directory" >&2; exit 2; }
  if "$PY" -m venv --system-site-packages "$WORK/venv" 2>/dev/null; then
    PY="$WORK/venv/bin/python"; TARGET=()
  else
    TARGET=(--user)
  fi
  mapfile -t MISSING < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    if name == "torch" or name == "triton" or name.startswith("nvidia-"):
        continue  # the image's CUDA build stays
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(whl)
EOF
  )
  if [[ ${#MISSING[@]} -gt 0 ]]; then
    "$PY" -m pip install --no-index --no-deps --quiet "${TARGET[@]}" "${MISSING[@]}"
  fi
  phase "installed ${#MISSING[@]} wheels from $WHEELS"
fi
"$PY" - <<'EOF'
import importlib, sys
missing = [m for m in ("megatron.core", "transformers", "safetensors", "yaml", "numpy", "tokenizers")
           if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing Python modules {missing}: add their wheels to --wheels DIR")
import torch
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
      f"transformer_engine {'yes' if importlib.util.find_spec('transformer_engine') else 'no (local spec)'}")
EOF

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
bolt() { "$PY" -m megatron_bolt "$@"; }
check() { "$PY" "$REPO/bench/gpu_check.py" "$@"; }

# ---------------------------------------------------------------- shapes
# examples/tinyllama/config.yaml: 30 steps, checkpoints at 25 and 30; the smoke shrinks its shapes
if [[ $SMOKE == 1 ]]; then
  VOCAB=512 STEPS=6 SAVE=4 SKIP=1 SEQ_LEN=128 DOCS=200 MAXLEN=256
  SHAPE=(model.num_layers=2 model.hidden_size=64 model.num_attention_heads=4 model.num_query_groups=2
         model.ffn_hidden_size=192 model.vocab_size=$VOCAB model.seq_len=$SEQ_LEN train.global_batch=8
         train.steps=$STEPS checkpoint.save_interval=$SAVE)
else
  VOCAB=32000 STEPS=30 SAVE=25 SKIP=5 SEQ_LEN=2048 DOCS=2000 MAXLEN=4096 SHAPE=()
fi
RUN="$WORK/run"
COMMON=("$REPO/examples/tinyllama/config.yaml" "${SHAPE[@]}"
        "data.prefixes=[$WORK/data/synthetic]" "data.cache_dir=$WORK/cache" "output_dir=$RUN")

check data "$WORK/data/synthetic" $VOCAB $DOCS $MAXLEN
phase "training $STEPS steps"
bolt train "${COMMON[@]}"
check throughput "$RUN/metrics.jsonl" $SKIP
cp "$RUN/metrics.jsonl" "$WORK/metrics_first.jsonl"

# ---------------------------------------------------------------- resume from the earlier checkpoint
phase "resuming from step $SAVE"
rm -rf "$RUN/checkpoints/iter_$(printf %07d "$STEPS")"
echo $SAVE > "$RUN/checkpoints/latest_checkpointed_iteration.txt"
# the finished run is exported to HF by its own rank 0 (what `bolt convert mcore-to-hf` does)
bolt train "${COMMON[@]}" --export-hf "$WORK/hf"
check resume "$WORK/metrics_first.jsonl" "$RUN/metrics.jsonl" $SAVE

# ---------------------------------------------------------------- HF export and scoring
check sequences "$WORK/seqs.jsonl" $VOCAB 4 $(( SEQ_LEN / 4 ))
bolt score --ckpt "$RUN/checkpoints" --input "$WORK/seqs.jsonl" --output "$WORK/scored.jsonl"
check score "$WORK/hf" "$WORK/scored.jsonl" "$WORK/seqs.jsonl" "$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
phase "all checks passed (work directory $WORK)"
