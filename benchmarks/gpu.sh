#!/usr/bin/env bash
# The GPU benchmark in one go: Llama-3.1-8B -> Llama-3.2-1B shapes (random weights, nothing downloaded)
# at 8 x 2048 tokens with gradient checkpointing (also with --mlp-chunks 4) and at 2 x 2048 without;
# plain full KD (the baseline), Neo plain, Neo chunked (llm-neo distill's default chunk, and chunk 256),
# and at 8 x 2048 Neo chunked with an int8 teacher and with an int8 teacher and an nf4 (QLoRA) student
# base. Each run is its own process, so an out-of-memory error ends that run only and is recorded in its row.
# On a node of several GPUs, also the teacher cache on one GPU and on all of them (bench --cache-ranks).
# Where `import trl` works (the `peers` extra), last: TRL's GKDTrainer side by side with llm-neo's whole
# runs (`--peers trl`) on the SmolLM2-135M -> 20-block shape at 4 x 256 (PEER_SHAPE; an 8B teacher in fp32
# in TRL's process would not fit). TRL trains that in fp32 (the bench turns its bf16 autocast off for the
# step-1 loss check), llm-neo in bf16: side by side, not like for like.
#
#   bash benchmarks/gpu.sh [OUTPUT_DIR]        # default: $OUT if set, else benchmarks/results
#
# Needs one GPU with >= 110 GiB (H100 80 GB: plain full KD at 8 x 2048 will be recorded as OOM) and the
# project's dependencies installed (the quantized rows: torchao and bitsandbytes, the `quant` extra;
# without them those rows record the error). About 5-6 minutes on an H200 (plus the TRL rows), and at most
# about BUDGET_S (default 570 s) in all: each bench gets what is left of it, the most important first, and a
# bench cut short keeps its finished runs in LABEL.runs.jsonl. Writes, per batch shape, LABEL.md /
# LABEL.json (the report, targets with PASS/FAIL) and LABEL.runs.jsonl (each run as it finishes), plus
# gpu-bench.log. SHAPE=tiny DEVICE=cpu bash benchmarks/gpu.sh /tmp/x rehearses the script on a CPU (about
# 4 minutes on 2 busy cores).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-bench.log"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .`
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
DATE="$(date +%F)"
SHAPE="${SHAPE:-llama3-8b-to-1b}"
DEVICE="${DEVICE:-cuda}"

{
  echo "== $(date -Is) llm-neo GPU benchmark -> $OUT_DIR"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} 2>&1 | tee "$LOG"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to measure" | tee -a "$LOG"
  exit 1
fi

status=0
BUDGET_S="${BUDGET_S:-570}"
START_S=$SECONDS
bench() {  # bench LIMIT_S LABEL [flags...]: at most LIMIT_S, and at most what is left of BUDGET_S
  local limit=$1 label=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START_S)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "== $(date -Is) $label: skipped, ${left} s of the ${BUDGET_S} s budget left" | tee -a "$LOG"
    status=1
    return
  fi
  echo "== $(date -Is) $label (limit ${limit} s)" | tee -a "$LOG"
  timeout --kill-after=20 "$limit" "$PY" -m llm_neo bench --shape "$SHAPE" --device "$DEVICE" \
    --warmup-steps 1 --steps 3 --run-timeout-s 120 --output "$OUT_DIR" --label "$label" "$@" 2>&1 \
    | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== exit $rc ($label)" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

# The issues' GPU targets are set for this one (issue 13's: the int8 teacher's cut in the peak against
# the weight bytes it saves).
bench 300 "$SHAPE-8x2048-ckpt-$DATE" --batch-size 8 --seq-len 2048 --gradient-checkpointing \
  --runs kd:plain neo:plain neo:chunked neo:chunked:256 neo+int8-teacher:chunked \
  neo+int8-teacher+nf4-student:chunked
# The same with each block's MLP checkpointed in 4 chunks (docs/memory.md, --mlp-chunks): the plan puts
# Neo under 1.15 x the weights floor only with it; what it costs in tokens/s is measured here.
bench 120 "$SHAPE-8x2048-ckpt-mlp4-$DATE" --batch-size 8 --seq-len 2048 --gradient-checkpointing \
  --mlp-chunks 4 --runs kd:plain neo:chunked
# the other anchor of benchmarks/results/h200-anchors.md.
bench 150 "$SHAPE-2x2048-$DATE" --batch-size 2 --seq-len 2048 \
  --runs kd:plain neo:plain neo:chunked

# Side by side with TRL (issue 25), when it is installed: the same inputs, batches and order.
PEER_SHAPE="${PEER_SHAPE:-$([ "$SHAPE" = tiny ] && echo tiny || echo smollm2-135m-20)}"
if "$PY" -c "import trl" 2>/dev/null; then
  SHAPE="$PEER_SHAPE" bench 150 "$PEER_SHAPE-peers-$DATE" --runs kd:plain --peers trl
else
  echo "== $(date -Is) no TRL rows: \`import trl\` fails (pip install 'llm-neo[peers]')" | tee -a "$LOG"
fi

# Issue 24's multi-GPU row: cache-teacher of the random teacher (the real shape, nothing downloaded) on one
# GPU and on every GPU of the node (torchrun, NCCL), the teacher replicated and FSDP2-sharded: teacher
# tokens/s per rank and in all, the peak per rank. Only with more than one GPU (CACHE_RANKS=N overrides
# the count: CACHE_RANKS=2 SHAPE=tiny DEVICE=cpu rehearses it on gloo). At 2 x 2048, where the always-run
# kd:plain step fits an 80 GB card; last, so it gets what is left of BUDGET_S (raise it for this row).
RANKS="${CACHE_RANKS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
if [ "$RANKS" -gt 1 ]; then
  bench 300 "$SHAPE-cache-ranks-$DATE" --batch-size 2 --seq-len 2048 --runs kd:plain --cache-ranks "$RANKS"
else
  echo "== $(date -Is) cache-ranks row skipped: ${RANKS} GPU(s), it needs more than one" | tee -a "$LOG"
fi

echo "== $(date -Is) done (status $status)" | tee -a "$LOG"
exit $status
