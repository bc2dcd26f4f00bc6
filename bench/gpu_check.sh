#!/usr/bin/env bash
# The GPU checks that CI (no GPU) cannot run, in one go on one NVIDIA GPU:
#
#   LLAMA_TOKENIZER=/path/to/llama3/tokenizer.model bash bench/gpu_check.sh [LOG_DIR]
#
# 1. bench/gpu_check.py --timings=False: model.py and generate.py on CUDA against the CPU (logits,
#    KV cache, compiled decode, bf16, a compiled bf16 training step).
#    Then bench/gpu_memory.py: bench/plan.py's phases against the allocator's peaks (1B shape: sft,
#    rl, and the 70B layout, FSDP2 mixed precision with offload, on one rank).
# 2. the main job's smoke variant on the GPU: every stage and hand-off, device "" = cuda, fp32.
# 3. the settings of a Llama-scale run: a 0.36B policy (dim 1024, 8 layers, GQA 16/8) with the real
#    Llama 3 tokenizer (128k vocab; from the llama-models package, or LLAMA_TOKENIZER), trained
#    from scratch for a few steps with bf16 autocast, torch.compile and grad checkpointing
#    (sft.py), then search.py, rl.py and eval.py on it in bf16 with the compiled decode step.
#    Random-ish weights: this checks that the paths run, not what they learn.
# 4. bench/gpu_check.py --checks=False: the speed of a Llama-3.2-1B-shaped model (decode, training).
# 5. the whole main job (runs/countdown.sh) on the GPU, for as long as BUDGET (seconds, default
#    540) allows; its stage times go to LOG_DIR/times.txt. Steps 1-4 use most of the default
#    BUDGET: give the main job a run of its own with a larger BUDGET.
# TIMINGS=0 skips step 4 and BUDGET=0 step 5: steps 1-3 then fit a 10-minute call.
# Logs go to LOG_DIR (default /tmp/gpu_check); work files to WORK (default /tmp/gpu_check/work).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/tmp/gpu_check}
W=${WORK:-/tmp/gpu_check/work}
BUDGET=${BUDGET:-540}
TIMINGS=${TIMINGS:-1}
mkdir -p "$LOG" "$W"
t0=$(date +%s)
LLAMA3_TOK="import llama_models, os
print(os.path.join(os.path.dirname(llama_models.__file__), 'llama3', 'tokenizer.model'))"
TOK=${LLAMA_TOKENIZER:-$(python -c "$LLAMA3_TOK" 2>/dev/null)}
status=0
# step NAME SECONDS COMMAND...: run it with a time limit, log to LOG/NAME.log, note the outcome
step() {
  name=$1 limit=$2; shift 2
  s=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  echo "    rc=$rc in $(( $(date +%s) - s )) s  ($LOG/$name.log)"
  tail -n 4 "$LOG/$name.log" | sed 's/^/    | /'
  [ $rc = 0 ] || { [ "$name" = main ] && [ $rc = 124 ]; } || status=1  # main may run out of BUDGET
}

step check 150 python bench/gpu_check.py --timings=False

step memory 120 python bench/gpu_memory.py

step smoke 150 env SMOKE=1 OUT="$W/smoke" bash runs/countdown.sh

if [ -f "$TOK" ]; then
  L=$W/llama
  BIG="--init=scratch --tokenizer=$TOK --dim=1024 --n_layers=8 --n_heads=16 --n_kv_heads=8"
  BIG="$BIG --max_seq_len=8192"
  FAST="--dtype=bfloat16 --compile=True"
  step llama 270 bash -c "set -e
    python data/countdown/prepare.py --out_dir=$L/data
    python sft.py $BIG $FAST --grad_checkpoint=True --data=$L/data/warmup.jsonl --seq_len=512 \
      --batch_size=32 --micro_batch=16 --max_steps=20 --lr=3e-4 --warmup_steps=5 --eval_every=0 \
      --save_every=20 --progress=False --out_dir=$L/sft
    python search.py config/search_countdown.py $FAST --policy=$L/sft \
      --problems=$L/data/train.jsonl --limit=16 --num_simulations=3 --max_rollout_tokens=64 \
      --out_dir=$L/search
    python rl.py $FAST --init=$L/sft --train=$L/data/train.jsonl --val=$L/data/val.jsonl \
      --max_steps=2 --prompts_per_step=8 --group_size=4 --max_new_tokens=64 --micro_batch=8 \
      --save_every=2 --out_dir=$L/rl
    python eval.py $FAST --init=$L/rl --data=$L/data/val.jsonl --limit=32 --num_samples=2 \
      --max_new_tokens=64 --out_dir=$L/eval"
else
  echo "=== llama: skipped (no Llama 3 tokenizer.model;" \
    "pip install --no-deps llama-models, or set LLAMA_TOKENIZER)"
  status=1
fi

[ "$TIMINGS" = 0 ] || step timings 200 python bench/gpu_check.py --checks=False

left=$(( BUDGET - ($(date +%s) - t0) ))
if [ $left -gt 60 ]; then
  step main $left env OUT="$W/main" bash runs/countdown.sh
  cp "$W/main/times.txt" "$LOG/times.txt" 2>/dev/null
  cp "$W/main/report.md" "$LOG/report.md" 2>/dev/null
else
  echo "=== main: skipped ($left s left of BUDGET=$BUDGET)"
fi
result=$([ $status = 0 ] && echo 'all steps passed' || echo 'some step FAILED')
echo "gpu_check: $result in $(( $(date +%s) - t0 )) s"
exit $status
