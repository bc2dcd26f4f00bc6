# Example GPU run: MCTS with a Llama 3 policy on MATH-style problems (closer to the paper's setting).
# The paths are placeholders: point policy at a Llama 3.x Instruct checkpoint (a Meta or a Hugging Face dir).
# torchrun --standalone --nproc_per_node=8 search.py config/search_llama_math.py
problems = "data/math/math_train.jsonl"  # python data/math/prepare.py --train=True
policy = "out/llama_math_policy"
out_dir = "out/search_llama_math"
limit = 0
num_simulations = 32        # not given by the paper; 32-64 is our guess
k = 4
M = 16                      # the paper's value
c_puct = 1.0
temperature = 1.0
rollout_temperature = 1.0
top_p = 1.0
max_depth = 30              # steps ("\n\n"-separated paragraphs) per solution
depth_slack = 0
max_step_tokens = 256
max_rollout_tokens = 2048
problems_per_batch = 64     # per GPU: 64 trees x 4 children x 16 rollouts = 4096 rollout rows per round
early_stop = True
seed = 1337
batch_size = 512            # decode rows per forward
compile = False             # True: ~1.6x faster decode on an H200 after a one-off compilation (15-60 s)
dtype = "bfloat16"
