# RL (GRPO-style) from the ASTRO-SFT policy on the built-in Countdown task (~1 + 7.5 min of the main job on 2 cores).
# python rl.py config/rl_astro.py
init = "out/sft_astro"
train = "data/countdown/train.jsonl"
val = "data/countdown/val.jsonl"
out_dir = "out/rl_astro"
prompts_per_step = 16
group_size = 4
max_new_tokens = 512
filter_samples = 4
filter_limit = 512
max_steps = 30
truncation = "wrong"  # a cut-off answer is a wrong answer: masking them (DAPO) let ASTRO-RL drift into endless
                      # backtracking (EXPERIMENTS.md, run 9: 33% -> 90% truncated)
lr = 1e-4
eval_every = 0
save_every = 20
