# RL (GRPO-style) from the ASTRO-SFT policy on the built-in Countdown task (~1 min of the main job on 2 cores: a
# short run that fits the 30-minute budget; 8 prompts x 8 samples x 10 steps, every train problem, no filter).
# python rl.py config/rl_astro.py
init = "out/sft_astro"
train = "data/countdown/train.jsonl"
val = "data/countdown/val.jsonl"
out_dir = "out/rl_astro"
prompts_per_step = 8
group_size = 8
max_new_tokens = 448  # as the eval; ~1.2x the longest ASTRO training trace
filter_samples = 0  # the filter (512 x 4 samples, ~170 s) would cost 3x this whole stage (EXPERIMENTS.md, runs 11, 13)
max_steps = 10
truncation = "mask"  # cut-off samples leave their group (DAPO): "wrong" taught ASTRO to finish sooner, not to solve
                     # (EXPERIMENTS.md run 29: +1.7 on val over "wrong"; run 30: no change on test and a fresh read);
                     # over longer or hotter runs masking drifts into endless backtracking (run 9: 33% -> 90%
                     # truncated in 40 steps; run 29's F2) - keep this run short
lr = 1e-4
eval_every = 0
save_every = 20
