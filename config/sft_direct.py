# Direct SFT, the control of the ablation (paper "Direct"): the same base policy, problems, trees
# and recipe as ASTRO SFT, but direct solutions without reflection or backtracking (one per ASTRO
# trace) and each wrong attempt alone, ending on its true verdict, and fewer passes. Applied on top
# of config/sft_astro.py, so the two arms differ only in their data and their length:
#   python sft.py config/sft_astro.py config/sft_direct.py
data = "out/linearize/direct.jsonl"  # the Direct traces linearize.py writes from the same trees
out_dir = "out/sft_direct"  # the Direct arm's own run
epochs = 2.0  # chosen on val: more passes overfit the Direct data (few distinct solutions per
              # problem), and 2 is the length whose val loss goes below the base's
