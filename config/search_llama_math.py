# Example GPU run: MCTS with a Llama 3 policy on MATH-style problems (closer to the paper's
# setting). The paths are placeholders: point policy at a Llama 3.x Instruct checkpoint (a Meta or
# a Hugging Face dir).
#   torchrun --standalone --nproc_per_node=8 search.py config/search_llama_math.py
problems = "data/math/math_train.jsonl"  # python data/math/prepare.py --train=True
policy = "/path/to/Llama-3.1-8B-Instruct"  # placeholder: the Llama 3.x Instruct policy (SFT's init)
out_dir = "out/search_llama_math"  # this search's own directory
limit = 0
num_simulations = 32        # not given by the paper; 32-64 is our guess
k = 4
M = 16                      # the paper's value
c_puct = 1.0
temperature = 1.0
rollout_temperature = 1.0
top_p = 1.0
max_depth = 30              # steps ("\n\n"-separated paragraphs) per solution
depth_slack = 0             # max_depth is set outright
max_step_tokens = 256       # a MATH step is a paragraph
max_rollout_tokens = 2048   # a whole MATH solution
problems_per_batch = 64     # per copy of the policy: 64 trees x 4 children x 16 rollouts
early_stop = True
seed = 1337
batch_size = 512            # decode rows per forward: a GPU takes more than a CPU
compile = False             # True: a faster decode after a one-off compilation
dtype = "bfloat16"          # GPUs: bf16 weights and KV cache
tp = 8                      # one copy of the policy over a node's 8 GPUs (bench/plan.py
                            # --stage=search: an 8B policy at batch_size 512 needs 8)
