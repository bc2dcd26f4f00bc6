# Direct RL for MATH: config/rl_llama_math.py from the Direct-SFT policy. Applied on top of it, so
# the two arms differ only in their start policy:
#   torchrun --standalone --nproc_per_node=8 rl.py config/rl_llama_math.py \
#       config/rl_direct_llama_math.py
init = "out/sft_direct_llama_math"  # config/sft_direct_llama_math.py's policy
out_dir = "out/rl_direct_llama_math"  # the Direct arm's own run
