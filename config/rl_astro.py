# RL (GRPO-style) from the ASTRO-SFT policy on the built-in Countdown task: a short run that fits
# the main job's CPU budget (8 prompts x 8 samples x 10 steps, every train problem, no filter).
# rl.py's defaults are this run; the file spells it out.
#   python rl.py config/rl_astro.py
init = "out/sft_astro"
train = "data/countdown/train.jsonl"
val = "data/countdown/val.jsonl"
out_dir = "out/rl_astro"
prompts_per_step = 8
group_size = 8
max_new_tokens = 448  # as the eval; ~1.2x the longest ASTRO training trace
filter_samples = 0  # the filter would cost more than this whole stage
max_steps = 10
truncation = "mask"  # cut-off samples leave their group (DAPO): "wrong" teaches ASTRO to finish
                     # sooner, not to solve more; over longer or hotter runs masking drifts into
                     # endless backtracking, so keep this run short
lr = 1e-4
eval_every = 0
save_every = 20
