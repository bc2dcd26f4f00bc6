#!/usr/bin/env bash
# The main job: the whole ASTRO pipeline on the built-in Countdown task, on a CPU.
#
#   bash runs/countdown.sh                          # the full run, into out/
#   SMOKE=1 OUT=/tmp/smoke bash runs/countdown.sh   # tiny budgets (the tests run it)
#   SPLIT=val bash runs/countdown.sh    # evaluate on val (-> out/eval_val, out/report_val.md): tune
#   SEED=2 OUT=out_seed2 bash runs/countdown.sh   # other training and sampling seeds, same problems
#
# prepare -> base policy (SFT from scratch on direct solutions) -> MCTS on train problems ->
# linearize (ASTRO and Direct traces from the same trees) -> SFT from the base on each -> RL from
# each SFT model -> eval of all five on the same held-out test problems -> report.md. Every stage
# resumes: re-running the script skips finished stages and continues an interrupted one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
SPLIT=${SPLIT:-test}
DATA=$OUT/data
EVALS=$OUT/eval; [ "$SPLIT" = test ] || EVALS=$OUT/eval_$SPLIT
mkdir -p "$OUT"

# SMOKE: tiny budgets and 2-number problems; it exercises every stage and hand-off, proves nothing
if [ "${SMOKE:-0}" = 1 ]; then
  PREP="--train=40 --warmup=2000 --val=8 --test=8 --levels=(2,) --level_mix=(1,)"
  PREP="$PREP --min_solutions=(1,) --hi=99"
  BASE="--max_steps=250 --batch_size=8 --micro_batch=8 --lr=3e-3 --dim=64 --n_layers=2 --n_heads=4"
  BASE="$BASE --n_kv_heads=2 --eval_every=0 --progress=False --compile=False"
  SEARCH="--limit=16 --num_simulations=6 --k=3 --M=4 --problems_per_batch=16"
  SEARCH="$SEARCH --max_rollout_tokens=64"
  SFT="--max_steps=10 --batch_size=8 --micro_batch=8 --eval_every=0 --progress=False"
  SFT="$SFT --compile=False"
  RL="--max_steps=3 --prompts_per_step=4 --filter_samples=0 --max_new_tokens=96"
  EVAL="--num_samples=2 --max_new_tokens=96"
else
  PREP=""; BASE=""; SEARCH=""; SFT=""; RL=""; EVAL=""
fi
# SEED: every stage's seed but the data preparation's (the problem splits stay the same)
LIN=""
if [ -n "${SEED:-}" ]; then
  for v in BASE SEARCH SFT RL EVAL LIN; do printf -v "$v" '%s --seed=%s' "${!v}" "$SEED"; done
fi

# Each stage's wall time goes to $OUT/times.txt (runs/stages.sh).
# shellcheck source=runs/stages.sh
source runs/stages.sh

stage "prepare the Countdown task"
# shellcheck disable=SC2086
python data/countdown/prepare.py --out_dir="$DATA" $PREP

stage "base policy: SFT from scratch on direct solutions"
# shellcheck disable=SC2086
python sft.py config/base_countdown.py --data="$DATA/warmup.jsonl" \
  --tokenizer="$DATA/tokenizer.model" --out_dir="$OUT/base" $BASE

stage "search: MCTS with the base policy"
# shellcheck disable=SC2086
python search.py config/search_countdown.py --problems="$DATA/train.jsonl" --policy="$OUT/base" \
  --out_dir="$OUT/search" $SEARCH

stage "linearize: ASTRO and Direct traces from the same trees"
for mode in astro direct; do
  # shellcheck disable=SC2086
  python linearize.py --mode=$mode \
    --trees="$OUT/search/trees.jsonl" --out="$OUT/linearize/$mode.jsonl" $LIN
done

for mode in direct astro; do
  stage "SFT $mode"
  # Direct = the ASTRO recipe with other data
  # shellcheck disable=SC2086
  python sft.py config/sft_astro.py config/sft_$mode.py --init="$OUT/base" \
    --data="$OUT/linearize/$mode.jsonl" --out_dir="$OUT/sft_$mode" $SFT
done

for mode in direct astro; do
  stage "RL $mode"
  # shellcheck disable=SC2086
  python rl.py config/rl_astro.py config/rl_$mode.py --init="$OUT/sft_$mode" \
    --train="$DATA/train.jsonl" --val="$DATA/val.jsonl" --out_dir="$OUT/rl_$mode" $RL
done

for name in base sft_direct sft_astro rl_direct rl_astro; do
  stage "eval $name"
  more=""; [ "${name#*_}" != direct ] || more=config/eval_direct.py  # samples to resample from
  # shellcheck disable=SC2086
  python eval.py config/eval_countdown.py $more --init="$OUT/$name" --data="$DATA/$SPLIT.jsonl" \
    --out_dir="$EVALS/$name" $EVAL
done

stage "report"
python runs/report.py --out="$OUT" --split="$SPLIT"
finish
report=$OUT/report$([ "$SPLIT" = test ] || echo "_$SPLIT").md
echo "main job finished in $(( $(date +%s) - t0 )) s; report: $report"
