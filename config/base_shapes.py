# Train the tiny base Janus of the built-in world from scratch (SFT, no game), on CPU, and export it
# to assets/shapes-base (float16 weights, about 9 MB). This is how the shipped base was made:
#     python train.py config/base_shapes.py
init_from = "scratch"
out_dir = "out/base-shapes"
export_dir = "assets/shapes-base"
export_dtype = "float16"
train_modules = "all"
lora_r = 0
w_clean = 1.0
w_gen = 1.0  # generation is learned here too
vq_iters = 700  # the VQ model learns alone first, so that the generation targets (its codes) hold still
train_n = 20000
batch_size = 32
max_iters = 2400
lr = 1e-3
min_lr = 5e-5
warmup_iters = 100
weight_decay = 0.01
eval_interval = 600
ckpt_interval = 500
game = False
