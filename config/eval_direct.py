# The Direct models' evaluation: eval_countdown.py with more samples per problem, so report.py can
# compare ASTRO with Direct's self-verified resampling at equal generated tokens (maj@c, pass@c).
num_samples = 20  # k >= 2 x ASTRO's mean tokens / Direct's (~350 / ~45)
