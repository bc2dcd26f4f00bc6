# Evaluation of the MATH recipe's checkpoints on MATH-500, one GPU per model (AIME 2024 and AMC
# 2023: --data=data/math/aime24.jsonl or data/math/amc23.jsonl):
#   python eval.py config/eval_llama_math.py --init=out/rl_llama_math
# Written for an 8B policy; a 70B one needs tp=4 (bench/plan.py --model=70B --stage=eval):
#   torchrun --standalone --nproc_per_node=8 eval.py config/eval_llama_math.py --tp=4
init = "out/rl_llama_math"  # the ASTRO-RL policy of config/rl_llama_math.py
data = "data/math/math500.jsonl"  # python data/math/prepare.py
num_samples = 16  # pass@1 over 16 samples per problem, and maj@16
temperature = 1.0  # as RL samples (config/rl_llama_math.py): the policy it trained
max_new_tokens = 8192  # >= RL's max_new_tokens and SFT's seq_len (the longest trace SFT teaches):
                       # the budget cuts off no answer those stages taught (a test checks)
chunk = 32  # problems per generate call: 512 samples
batch_size = 32  # rows of up to ~8.7k tokens: an 8B policy's bf16 KV cache (0.13 MB a token)
                 # takes ~37 GB
dtype = "bfloat16"  # GPUs: bf16 weights and KV cache
compile = True  # decode speed over thousands of tokens per answer is worth the one-off compile
tp = 1  # 8B: its bf16 weights and KV cache fit one GPU (bench/plan.py --stage=eval: 1 GPU)
