# The built-in task's base policy (the stand-in for Llama-3.1-70B-Instruct, which solves step by
# step and never backtracks): a small Llama 3 trained from scratch on direct Countdown solutions
# (data/countdown/warmup.jsonl). sft.py's defaults are this recipe; the file spells it out.
#   python sft.py config/base_countdown.py
# Sized for the main job's CPU budget, where fp32 is the fast path: dim 128, 4 layers (~1.0M
# parameters); a wider model trains too slowly for the budget.
# Token budget: 600 steps x 32 rows x 256 tokens = 4.9M token slots (~2 epochs of warmup.jsonl).
# Rows of 256 tokens: conversations are ~50-75 tokens.
init = "scratch"
tokenizer = "data/countdown/tokenizer.model"
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
max_seq_len = 4096
data = "data/countdown/warmup.jsonl"
val_frac = 0.02
loss_on = "assistant"  # the prompts (random numbers and targets) are not worth modelling
seq_len = 256
batch_size = 32
micro_batch = 32
max_steps = 600
lr = 3e-3
warmup_steps = 20
min_lr_frac = 0.1
weight_decay = 0.1
grad_clip = 1.0
dtype = "float32"  # bf16 autocast is far slower than fp32 on CPUs without AMX or AVX512-BF16
compile = True  # each block compiled: ~15% faster steps for a ~15 s start
out_dir = "out/base"
eval_every = 200  # val loss less often than the default: each pass takes time from the budget
save_every = 50
