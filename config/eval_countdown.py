# Evaluation settings of the main job (runs/countdown.sh): 4 samples per problem at temperature 1 (pass@1 = mean,
# maj@4) plus one greedy answer, with room for ASTRO's longer traces (a direct 4-number solution is ~45 tokens).
num_samples = 4
temperature = 1.0
greedy = True
max_new_tokens = 512
