# Direct baseline: the same trees, plain root->correct-terminal paths, as many examples per tree as
# astro mode.
#   python linearize.py config/linearize_direct.py
mode = "direct"  # the baseline's traces: no reflection, no backtracking
