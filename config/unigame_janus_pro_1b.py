# UniGame post-training of Janus-Pro-1B on VQAv2, with the published hyperparameters where there are some.
#     torchrun --nproc_per_node=8 train.py config/unigame_janus_pro_1b.py
# Edit the paths below, or override any of them on the command line (--init_from=..., --vqav2_images=...).
# "published": from the paper (Su et al., UniGame: Turning a Unified Multimodal Model Into Its Own Adversary,
# arXiv:2511.19413) or its public code (github.com/AIFrontierLab/UniGame, since archived, and the toolkit that
# carries it on, github.com/AIFrontierLab/TorchUMM, configs/posttrain/unigame.yaml); a range is the span of values
# found there. "ours": a choice of this repository. Keys not set here keep train.py's defaults (python train.py --help).

# ---- paths ----
init_from = "checkpoints/Janus-Pro-1B"  # a local Hugging Face directory (e.g. deepseek-community/Janus-Pro-1B)
vqav2_questions = "data/vqav2/v2_OpenEnded_mscoco_train2014_questions.json"
vqav2_annotations = "data/vqav2/v2_mscoco_train2014_annotations.json"
vqav2_images = "data/vqav2/train2014"  # COCO_train2014_000000xxxxxx.jpg
# evaluated on, never trained on (all three '': a held-out slice of the training data instead)
eval_vqav2_questions = "data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
eval_vqav2_annotations = "data/vqav2/v2_mscoco_val2014_annotations.json"
eval_vqav2_images = "data/vqav2/val2014"  # COCO_val2014_000000xxxxxx.jpg
out_dir = "out/unigame-janus-pro-1b"
export_dir = "out/unigame-janus-pro-1b/export"  # merged model (HF format) + perturber.safetensors/.json
export_dtype = "bfloat16"

# ---- data ----
dataset = "vqav2"
skip_bad = True  # ours: an unreadable COCO image is skipped and counted, not fatal, in a long multi-GPU run
num_workers = 4  # ours: JPEG decoding per process
prompt_suffix = "Answer the question using a single word or phrase."  # ours: after each question, asks for VQA's short answers (LLaVA-style)
answer_tokens = 16  # ours: most tokens of a generated answer (VQAv2's fit)

# ---- what trains: LoRA on the LM projections, as published ----
lora_r = 16  # published
lora_alpha = 32  # published
lora_dropout = 0.05  # published
train_modules = ""
load_dtype = "bfloat16"  # ours: the frozen weights in 16 bits (half the memory); the LoRA and the perturber stay float32
gradient_checkpointing = False  # 1B fits without

# ---- the game ----
game = True
# Consistency: the built-in score s (train.py's tau = 0.9, ours); the published one is CLIP's image-text cosine
# with tau 0.30–0.35: set clip_path to a local CLIP directory (and tau) for that.
# Published: δ on the LM-space understanding tokens (after the aligner), absolute budget ε in [0, 0.02],
# starting at 0.01. perturb_at='vq' would instead perturb the VQ encoder's codebook-space tokens, project them
# onto the codebook and decode a real image (decoder-constrained, costlier); there ε is a fraction of each
# token's norm (eps_relative=True) and must be chosen anew, as no published value exists for that space
# (the built-in world uses eps_max 0.3, eps_init 0.15).
perturb_at = "aligner"
eps_relative = False
refine_steps = 0  # the published perturber alone, no PGD aim step on its delta (as train.py's default)
eps_min = 0.0  # published
eps_max = 0.02  # published
eps_init = 0.01  # published
lam = 100.0  # λ, published 80–120
lr_G = 1e-2  # the perturber's AdamW lr (weight decay 0); published 1e-2–3e-2
# Mining: 'decode' uses this batch's perturbed tokens (plus cand_k - 1 jittered draws). The published route is
# mine='generate' (cand_k images generated per question, with guidance gen_cfg), far costlier per step.
mine = "decode"  # ours
mine_stride = 1  # published 1–2
cand_k = 2  # ours (published: 3–4 generated images)
gen_cfg = 5.0  # published (Janus-Pro's usual guidance); used by mine='generate' only
q_hard = 0.75  # published 0.7–0.8
hard_topk = 2  # published
buffer_capacity = 4096  # published
buffer_temperature = 1.75  # published 1.5–2.0
hard_bs = 8  # published 6–8

# ---- optimisation ----
w_clean = 1.0  # published 1.0–1.5
w_gen = 0.0  # ours: generation is not trained here
batch_size = 8  # per GPU; published 1–8
lr = 5e-6  # published 3e-6–5e-6
min_lr = 5e-7  # ours
warmup_iters = 100  # ours
max_iters = 6900  # ours: about one pass over VQAv2 train (443,757 questions) at 8 GPUs x 8
weight_decay = 0.01  # published
grad_clip = 1.0  # published
log_interval = 10  # ours, as are the three below
eval_interval = 1000
eval_n = 256
ckpt_interval = 1000
