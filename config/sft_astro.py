# ASTRO SFT (paper §3.1): fine-tune the base policy on the linearized search traces (with
# self-reflection and backtracking), AdamW, cosine schedule (the paper: 1 epoch; the 1M-parameter
# base needs 10).
#   python sft.py config/sft_astro.py
# Token budget: 10 epochs of out/linearize/astro.jsonl (the first log line prints it; ~0.35M tokens
# per epoch for the main job's 700 searched problems).
# loss_on: the paper trains on all tokens; we train on the assistant tokens. The prompt (random
# numbers and a target) adds only an irreducible term for a small model trained for a short run;
# both SFT runs use the same setting, so the ASTRO-vs-Direct comparison stays fair. --loss_on=all
# is the paper's setting.
init = "out/base"  # fine-tune the base policy
data = "out/linearize/astro.jsonl"  # the ASTRO traces linearize.py writes
out_dir = "out/sft_astro"  # this run's own directory
loss_on = "assistant"  # deviation from the paper's all-token loss: see above
seq_len = 448  # the longest ASTRO trace of the main job is ~410 tokens (prompt included)
skip_long = True  # a rare longer trace is dropped and counted in the first log line, not fatal
val_frac = 0.02  # held out by problem id, so no problem has traces on both sides
epochs = 10.0  # many passes: the reflection phrases are new tokens for the base, and fewer epochs
               # (over a shorter cosine schedule) leave them underfit
max_steps = 0  # 0: the step count follows from epochs
batch_size = 18  # 18 x 448 = 8k tokens per step
micro_batch = 18  # the whole batch in one forward
lr = 1e-3  # a fine-tune: a third of the base's from-scratch rate
warmup_steps = 5  # a short warm-up: the weights are already trained
min_lr_frac = 0.1
weight_decay = 0.1
grad_clip = 1.0
dtype = "float32"  # bf16 autocast is far slower than fp32 on CPUs without AMX or AVX512-BF16
compile = True  # each block compiled: ~15% faster steps for a ~15 s start
eval_every = 20  # val loss every 20 steps of a run of a few hundred
save_every = 20  # state.pt as often: a killed run redoes at most 20 steps
