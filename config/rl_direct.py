# The Direct baseline: the same RL run, from the SFT policy trained on direct (no-backtrack) traces.
# python rl.py config/rl_direct.py
init = "out/sft_direct"
train = "data/countdown/train.jsonl"
val = "data/countdown/val.jsonl"
out_dir = "out/rl_direct"
prompts_per_step = 16
group_size = 4
max_new_tokens = 512
filter_samples = 8
filter_limit = 1024
max_steps = 200
lr = 1e-5
