# Procedure cloning of the MATH search trees, the ASTRO arm, on one GPU (the policy judges Psi'):
#   python linearize.py config/linearize_llama_math.py
# Psi' is the paper's self-evaluation (Appendix A.1): the search policy judges each correct terminal
# 8 times and keeps it only if all 8 verdicts say correct. The verdicts go to
# out/math_linearize/self_eval.jsonl (a killed run resumes from it), which the Direct arm
# (config/linearize_direct_llama_math.py) reads: the policy judges once for both arms.
trees = "out/search_llama_math/trees.jsonl"  # config/search_llama_math.py's trees
out = "out/math_linearize/astro.jsonl"  # config/sft_llama_math.py's data
ks = (0, 1, 1, 2)  # the paper's mix: one direct trace and three with backtracking per problem
max_tokens = 8192  # config/sft_llama_math.py's seq_len: SFT never meets a longer conversation
judge_n = 8  # the paper's N
judge_unanimous = True  # the paper keeps a terminal only if all N verdicts say correct
judge_per_tree = 8  # twice the 4 n* a tree gives: with rollouts kept, a tree can hold hundreds
                    # of correct terminals, and each costs 8 judge samples
judge_batch_size = 64  # rows of ~3k tokens (solution + 1024 new): an 8B policy's bf16 KV cache
                       # (0.13 MB a token) takes ~25 GB
dtype = "bfloat16"  # GPUs: bf16 judge weights and KV cache
