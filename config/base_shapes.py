# Train the tiny base Janus of the built-in world from scratch (SFT, no game), on CPU, and export it
# to assets/shapes-base (float16 weights, about 10 MB). This is how the shipped base was made:
#     python train.py config/base_shapes.py
# Steps 0-599: the VQ model learns to reconstruct, and SigLIP learns to name each object's colour and
# shape (vision_labels_iters). Steps 600-3299: understanding (a tenth of it captioning) + text-to-image on
# half of each batch, while SigLIP keeps its labels.
init_from = "scratch"
out_dir = "out/base-shapes"
export_dir = "assets/shapes-base"
export_dtype = "float16"
train_modules = "all"
lora_r = 0
w_clean = 1.0
w_gen = 1.0  # generation is learned here too
gen_bs = 16  # ... on half of each batch: it learns fast enough, and understanding gets the steps
caption_p = 0.1  # a tenth of the understanding samples are 'describe the image.' -> the caption
aligner_init_scale = 0.1  # image tokens enter the LM near the scale of the text embeddings
vision_pos_init_scale = 10.0  # SigLIP's position embeddings start near the scale of its patch embeddings
vq_iters = 600  # the VQ model learns alone first, so that the generation targets (its codes) hold still
vision_labels_iters = 3300  # SigLIP is trained on the world's labels too, throughout
vision_layers = 4  # SigLIP depth: with 2 layers its tokens hardly tell the shapes apart
train_n = 20000
batch_size = 32
max_iters = 3300
lr = 1e-3
min_lr = 5e-5
warmup_iters = 100
weight_decay = 0.01
eval_interval = 1100
ckpt_interval = 500
game = False
