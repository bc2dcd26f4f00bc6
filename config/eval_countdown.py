# Evaluation settings of the main job (runs/countdown.sh): 3 samples per problem at T=0.6, top-p 0.95 (pass@1 =
# mean, maj@3) plus one greedy answer, with room for ASTRO's longer traces (a direct 4-number solution is ~45 tokens).
num_samples = 3
temperature = 0.6  # chosen on val (run 9): at 1.0 the small models' long ASTRO traces derail; same for all five
top_p = 0.95
greedy = True
max_new_tokens = 448  # the longest ASTRO training trace is ~370 response tokens. More room than the training traces
                      # adds nothing: past their length the models derail (EXPERIMENTS.md, runs 25-26)
