# Direct SFT for MATH, the control of the ablation: config/sft_llama_math.py on the Direct traces of
# the same trees. Applied on top of it, so the two arms differ only in their data:
#   torchrun --standalone --nproc_per_node=8 sft.py config/sft_llama_math.py \
#       config/sft_direct_llama_math.py
data = "out/math_linearize/direct.jsonl"  # config/linearize_direct_llama_math.py's output
out_dir = "out/sft_direct_llama_math"  # the Direct arm's own run
