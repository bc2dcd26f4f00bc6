# MCTS on the built-in Countdown task within the main job's CPU budget.
#   python search.py config/search_countdown.py
# Cost: a tree costs about rounds x (k steps of ~15 tokens + up to k new children x M rollouts of
# ~20-45 tokens); early stopping and re-selected terminals (no sampling) cut most trees short. See
# the stats line / stats.json (decode_tokens_per_s, mean_simulations) of a first run and scale
# `limit` to the time you have. The prefix cache (search.py's default) extends each path from the
# keys/values of the round before, so the search prefills ~5% as many tokens as it decodes.
problems = "data/countdown/train.jsonl"
policy = "out/base"
out_dir = "out/search"
limit = 1400                # the first 1400 problems of train.jsonl (shuffled: ~1/3 with 3
                            # numbers, ~2/3 with 4): ~2.3k ASTRO traces; the SFT models need
                            # the data (half as many traces leave ASTRO 2 points lower on val)
num_simulations = 12        # rounds per tree; Countdown trees are shallow (3-4 steps), 12 covers
                            # k^2 paths
k = 3                       # next steps per expansion: a shallow tree needs little width
M = 4                       # rollouts per new child (paper: 16; 4 keeps Q in quarters and the CPU
                            # budget)
c_puct = 1.0
temperature = 1.0
rollout_temperature = 1.0
top_p = 1.0
max_depth = 0               # 0: len(numbers) + depth_slack steps (a trace has len(numbers) - 1
                            # lines)
depth_slack = 2
max_step_tokens = 48        # a step is ~15 tokens
max_rollout_tokens = 160    # a whole 4-number trace is ~45 tokens
problems_per_batch = 256    # 256 trees per round: ~750 expansion rows and ~3000 rollout rows per
                            # generate call, large batches for the CPU
early_stop = True
seed = 1337
batch_size = 256
dtype = "float32"
