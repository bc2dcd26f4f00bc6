# Evaluation settings of the main job (runs/countdown.sh): 3 samples per problem at T=0.6, top-p
# 0.95 (pass@1 = mean, maj@3) plus one greedy answer, with room for ASTRO's longer traces (a direct
# 4-number solution is ~45 tokens).
num_samples = 3  # three samples per problem give maj@3 and a steadier pass@1
temperature = 0.6  # chosen on val: at 1.0 the small models' long ASTRO traces derail (the same
                  # for all five models)
top_p = 0.95  # cuts the sampling tail, where the small models' traces derail
greedy = True  # plus one greedy answer per problem (greedy accuracy)
max_new_tokens = 448  # the longest ASTRO training trace is ~370 response tokens; past the length of
                      # their training traces the models derail, so more room adds nothing
