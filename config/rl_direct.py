# The Direct baseline of RL: the same run as config/rl_astro.py, from the SFT policy trained on
# direct (no-backtrack) traces. Applied on top of config/rl_astro.py, so the two arms differ only
# in their start policy:
#   python rl.py config/rl_astro.py config/rl_direct.py
init = "out/sft_direct"  # the Direct-SFT policy
out_dir = "out/rl_direct"  # the Direct arm's own run
