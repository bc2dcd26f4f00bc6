# Linearize for the main job on the built-in Countdown task: one more wrong attempt per search
# trace than the paper's mix (linearize.py's default ks = (0, 1, 1, 2)), so the traces show up to
# four attempts; the 4-number level needs them. Both modes read it, so the Direct set keeps
# ASTRO's count per tree:
#   python linearize.py config/linearize_countdown.py [--mode=direct]
ks = (0, 1, 2, 3)  # up to three wrong attempts before the correct one
