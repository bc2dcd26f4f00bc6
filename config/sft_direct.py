# Direct SFT, the control of the ablation (paper "Direct"): the same base policy, problems, trees, number of
# examples and recipe as ASTRO SFT, but direct solutions without reflection or backtracking, and fewer passes.
# Applied on top of config/sft_astro.py, so the two arms differ only in their data and their length:
#   python sft.py config/sft_astro.py config/sft_direct.py
data = "out/linearize/direct.jsonl"
out_dir = "out/sft_direct"
epochs = 2.0  # chosen on val (EXPERIMENTS.md, run 18): ASTRO's 10 epochs overfit the Direct data (~1.2k examples,
              # ~360 distinct solutions): its val loss ended above the base's at 4 and 10 epochs, and val pass@1 fell
              # to 15.2 at 10 (base 17.4); 2 epochs, the only length whose val loss went below the base's: 17.2
