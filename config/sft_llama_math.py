# ASTRO SFT of a Llama 3 Instruct model on MATH search traces, on GPUs (the paper's setting, scaled
# down from 70B). Set init first (a placeholder). A Hugging Face dir (config.json + *.safetensors)
# or a Meta dir (params.json + consolidated.*.pth) works as init.
#   1 GPU  (Llama-3.2-1B/3B-Instruct):
#     python sft.py config/sft_llama_math.py --fsdp=False --micro_batch=1
#   8 GPUs (Llama-3.1-8B-Instruct):
#     torchrun --standalone --nproc_per_node=8 sft.py config/sft_llama_math.py
#   8 GPUs (Llama-3.1-70B-Instruct): the same, init a 70B dir, with --offload=True (bench/plan.py
#     --model=70B --stage=sft --sft_offload=True: 59 GB per GPU, 1.13 TB of host memory for shards)
# Memory: a full fine-tune keeps fp32 weights + grads + 2 AdamW moments = 16 bytes/param: 1B ~20
# GB, 3B ~51 GB (one 80 GB GPU), 8B ~128 GB (needs fsdp=True over >= 2 GPUs), plus activations
# (grad_checkpoint keeps them small) and the fp32 logits of a row (8192 x 128256 x 4 bytes = 4.2
# GB, times ~3 with the loss and its gradient).
# Token budget: 1 epoch of the traces; e.g. 36k traces (the paper's 36.1K) x ~1.5k tokens = ~54M
# tokens.
init = "/path/to/Llama-3.1-8B-Instruct"  # or Llama-3.2-1B-Instruct, Llama-3.2-3B-Instruct
data = "out/math_linearize/astro.jsonl"  # config/linearize_llama_math.py's traces (capped at
                                         # seq_len there)
val_data = ""  # "" = hold out val_frac of the problems
out_dir = "out/sft_llama_math"  # this run's own directory
loss_on = "all"  # as the paper (no masking); see config/sft_astro.py for the trade-off
seq_len = 8192  # the paper's max sequence length; linearize's max_tokens (a test checks)
epochs = 1.0
max_steps = 0  # 0: one epoch decides the step count
batch_size = 64  # rows of up to 8192 tokens: ~0.5M tokens per step
micro_batch = 1  # one 8192-token row per forward per GPU: memory
logit_chunk = 1024  # the output layer 1024 positions at a time: 1 GB of fp32 logits, not 8
lr = 1e-5  # the paper used 3e-6 for 70B; smaller models take a somewhat larger rate
warmup_steps = 10  # a short warm-up: the weights are already trained
min_lr_frac = 0.1
weight_decay = 0.0  # a fine-tune of a pretrained model: no decay
grad_clip = 1.0
dtype = "bfloat16"  # GPUs: bf16 compute over fp32 master weights (FSDP2's mixed precision;
                    # one GPU: autocast)
compile = True  # a long GPU run: the one-off compile pays for itself
fsdp = True  # 8B with fp32 AdamW state does not fit one GPU
grad_checkpoint = True  # rows of 8192 tokens: recompute activations instead of storing them
eval_every = 50
save_every = 50
log_every = 1  # each step is long: log every one
