"""linearize.py — procedure cloning (ASTRO Algorithm 1). Work in progress: phrase constants first."""

# The self-reflection texts of the paper (hard-coded there too). eval.py counts them; the Countdown tokenizer is
# trained over them; search never sees them.
REFLECT = "But wait, are we solving the problem correctly so far? Hmm..."
NOT_SURE = "I'm not sure if we're solving the problem correctly so far."
GO_BACK = "Let's go back to where we"        # + " <restated step>."
RESTART = "Let's restart our solution from the beginning."
SEEMS_RIGHT = "Our solution seems to be correct so far."
