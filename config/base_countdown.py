# The built-in task's base policy (the stand-in for Llama-3.1-70B-Instruct, which solves step by step and never
# backtracks): a 3.4M-parameter Llama 3 trained from scratch on direct Countdown solutions. These are sft.py's
# defaults, spelled out.   python sft.py config/base_countdown.py
# Token budget: max_steps * batch_size * seq_len = 150 * 16 * 1024 = 2.46M token slots (~2.4M data tokens, ~3%
# padding) = ~0.9 epoch of the current warmup.jsonl (30k conversations, 2.6M tokens): ~5.5 min at the planned
# ~7.5k tokens/s on 2 cores. Measured on this machine (fp32, AVX2, shared cores): 1.1-1.5k tokens/s with 1 thread,
# i.e. ~30 min; the first log line prints steps, epochs and tokens.
init = "scratch"
tokenizer = "data/countdown/tokenizer.model"
dim = 256
n_layers = 4
n_heads = 8
n_kv_heads = 4
max_seq_len = 4096
data = "data/countdown/warmup.jsonl"
val_frac = 0.02
loss_on = "assistant"  # the prompts (random numbers and targets) are not worth modelling for a base policy
seq_len = 1024
batch_size = 16
micro_batch = 4
max_steps = 150
lr = 1e-3
warmup_steps = 20
min_lr_frac = 0.1
weight_decay = 0.1
grad_clip = 1.0
dtype = "float32"  # bf16 autocast is ~10x slower than fp32 on this AVX2-only CPU (no AMX/AVX512-BF16)
out_dir = "out/base"
eval_every = 50
save_every = 50
