# Direct SFT, the control of the ablation (paper "Direct"): the same base policy, problems, trees, number of
# examples and recipe as ASTRO SFT, but direct solutions without reflection or backtracking. Applied on top of
# config/sft_astro.py, so the two arms can only differ in their data:
#   python sft.py config/sft_astro.py config/sft_direct.py
data = "out/linearize/direct.jsonl"
out_dir = "out/sft_direct"
