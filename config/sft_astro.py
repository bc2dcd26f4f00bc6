# ASTRO SFT (paper §3.1): fine-tune the base policy on the linearized search traces (with self-reflection and
# backtracking), 1 epoch, AdamW, cosine schedule, as the paper did.   python sft.py config/sft_astro.py
# Token budget: 1 epoch of out/linearize/astro.jsonl, i.e. its token count (+~3% padding). With search's 1000
# problems and ~3 traces of ~100-200 tokens each: ~0.3-0.6M tokens, 1-1.5 min at the planned ~7.5k tokens/s on 2
# cores (measured here: 1.1-1.5k tokens/s with 1 thread, so 4-9 min). The first log line prints the exact numbers.
#
# loss_on = "all" follows the paper ("train on all tokens from each example without any masking"). What it costs
# here: the prompt (the numbers and the target) is random, so its tokens add an irreducible term to the loss (the
# logged loss is higher than the assistant-only loss and not comparable with out/base's), and part of the
# gradient goes into modelling the prompt distribution instead of the reasoning. For a 70B model this hardly
# matters; for a 3.4M model it dilutes one short epoch somewhat. The Direct control uses the same setting, so the
# ASTRO-vs-Direct comparison stays fair; --loss_on=assistant is the ablation to run if SFT looks undertrained.
init = "out/base"
data = "out/linearize/astro.jsonl"
out_dir = "out/sft_astro"
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
