# Direct SFT, the control of the ablation (paper "Direct"): the same base policy, the same problems, trees and
# number of examples as config/sft_astro.py, but direct solutions without reflection or backtracking, trained with
# the same recipe (1 epoch, loss on all tokens).   python sft.py config/sft_direct.py
# Token budget: 1 epoch of out/linearize/direct.jsonl; direct traces are shorter than ASTRO traces (~80-100 tokens):
# ~0.3M tokens for 1000 problems x ~3 traces, ~40 s at the planned ~7.5k tokens/s on 2 cores (measured here:
# 1.1-1.5k tokens/s with 1 thread, so ~4 min).
# loss_on = "all" as in sft_astro.py (the paper's setting; the trade-off is discussed there).
init = "out/base"
data = "out/linearize/direct.jsonl"
out_dir = "out/sft_direct"
loss_on = "all"
seq_len = 1024  # a longer trace stops the run with its file:line; raise this or pass --skip_long=True
val_frac = 0.02  # held out by problem id, so no problem has traces on both sides
epochs = 1.0
max_steps = 0  # 0: the step count follows from epochs
batch_size = 8  # rows of <= 1024 tokens: ~8k tokens per step, so one small epoch still has 40+ steps
micro_batch = 4
lr = 3e-4  # the paper's 3e-6 is for a 70B model; small models fine-tune at 1e-4..3e-4
warmup_steps = 5
min_lr_frac = 0.1
weight_decay = 0.1
grad_clip = 1.0
dtype = "float32"  # bf16 autocast is ~10x slower than fp32 on this AVX2-only CPU (no AMX/AVX512-BF16)
eval_every = 20
save_every = 20
