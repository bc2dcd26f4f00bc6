# The Direct arm of the MATH recipe: config/linearize_llama_math.py (the same trees, ks, length cap
# and Psi'), but plain root->n* paths and each wrong attempt alone. Applied on top of it, after the
# ASTRO arm: it reads the verdicts that arm wrote (self_eval.jsonl in the same folder), so the
# policy judges once:
#   python linearize.py config/linearize_llama_math.py config/linearize_direct_llama_math.py
mode = "direct"  # the baseline's traces: no reflection, no backtracking
out = "out/math_linearize/direct.jsonl"  # config/sft_direct_llama_math.py's data
