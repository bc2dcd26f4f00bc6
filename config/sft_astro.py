# ASTRO SFT (paper §3.1): fine-tune the base policy on the linearized search traces (with self-reflection and
# backtracking), AdamW, cosine schedule (the paper: 1 epoch; the 1M-parameter base needs 10).
#   python sft.py config/sft_astro.py
# Token budget: 10 epochs of out/linearize/astro.jsonl (the first log line prints it; ~0.35M tokens per epoch for
# the main job's 700 searched problems), at ~6-7k tokens/s on 2 cores: ~8-9 min.
# loss_on: the paper trains on all tokens; we train on the assistant tokens. The prompt (random numbers and a
# target) adds only an irreducible term for a small model trained for a short run; both SFT runs use the same
# setting, so the ASTRO-vs-Direct comparison stays fair. --loss_on=all is the paper's setting.
init = "out/base"
data = "out/linearize/astro.jsonl"
out_dir = "out/sft_astro"
loss_on = "assistant"  # deviation from the paper's all-token loss: see EXPERIMENTS.md
seq_len = 448  # the longest ASTRO trace of the main job is ~410 tokens (prompt included; config/linearize_countdown.py)
skip_long = True  # a rare longer trace is dropped and counted in the first log line instead of stopping the job
val_frac = 0.02  # held out by problem id, so no problem has traces on both sides
epochs = 10.0  # many passes: the reflection phrases are new tokens for the base; 3, 5 or 6 epochs (with the cosine
              # schedule over fewer steps) left them underfit (EXPERIMENTS.md, runs 2-3, 10 and 23)
max_steps = 0  # 0: the step count follows from epochs
batch_size = 18  # 18 x 448 = 8k tokens per step, as 16 x 512 before
micro_batch = 18
lr = 1e-3
warmup_steps = 5
min_lr_frac = 0.1
weight_decay = 0.1
grad_clip = 1.0
dtype = "float32"  # bf16 autocast is ~10x slower than fp32 on this AVX2-only CPU (no AMX/AVX512-BF16)
eval_every = 20
save_every = 20
