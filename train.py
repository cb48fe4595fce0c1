"""
UniGame training: one explicit loop, read top to bottom.

    python train.py                                      # UniGame post-training of assets/shapes-base
    python train.py config/base_shapes.py                # rebuild the base model from scratch (SFT)
    python train.py --game=False                         # the SFT baseline: same data, steps, optimizer
    torchrun --nproc_per_node=8 train.py config/unigame_janus_pro_7b.py

Every module-level name below is a configuration key; config/*.py files and --key=value flags
override them (configurator.py). Unknown keys are errors.
"""

import datetime
import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from eval import evaluate, perturbed_embed, understanding_accuracy
import torch.nn.functional as F
from buffer import HardBuffer, hardness, select_hard
from model import UMM, add_lora, build_tokenizer, clip_scorer, save_perturber, tiny_config
from perturber import Perturber, random_like, regularizer

# -----------------------------------------------------------------------------------------------
# configuration
# I/O
out_dir = "out"
init_from = "assets/shapes-base"  # 'scratch' | 'resume' | a local Hugging Face directory
export_dir = ""  # when set, the final model is also written there (merged LoRA, HF format)
export_dtype = "float32"  # dtype of exported weights: float32 | float16 | bfloat16
log_interval = 10
eval_interval = 100  # 0: evaluate only at the end
eval_n = 256  # test samples per evaluation (understanding); a quarter of that for generation
ckpt_interval = 100
seed = 1337
# data
dataset = "shapes"  # 'shapes' | 'vqav2' | 'jsonl'
train_n = 20000  # samples of the built-in world's train split
vqav2_questions = ""  # path to v2_OpenEnded_mscoco_train2014_questions.json
vqav2_annotations = ""  # path to v2_mscoco_train2014_annotations.json
vqav2_images = ""  # folder of COCO train2014 images
jsonl_path = ""  # a JSONL manifest: {"image", "question", "answers", "caption"?}
skip_bad = False  # skip (count and report) unreadable samples instead of stopping
num_workers = 0
# model
tokenizer_vocab = 512  # init_from='scratch' only: BPE vocabulary trained on the world's text
vision_layers = 2  # init_from='scratch' only: SigLIP depth
lm_layers = 4  # init_from='scratch' only: LM depth
lora_r = 16  # 0: no LoRA; else LoRA rank on the LM projections (q, k, v, o, gate, up, down)
lora_alpha = 32
lora_dropout = 0.05
load_dtype = "float32"  # weights as loaded: 'bfloat16' halves memory when only LoRA trains (LoRA stays float32)
train_modules = ""  # comma list of fully trained parts: vision,aligner,lm,gen,vq | all | '' (LoRA only)
gradient_checkpointing = False
# objective: loss_D = w_clean*CE(clean) + CE(hard samples) [+ w_gen*CE(image codes) + w_vq*VQ losses]
w_clean = 1.0  # understanding cross-entropy on the clean batch
w_gen = 0.0  # text-to-image cross-entropy over VQ codes (keeps generation trained; the base uses 1.0)
gen_uncond_p = 0.1  # share of text-to-image samples trained with the unconditional prompt (for guidance)
gen_bs = 0  # the text-to-image loss uses the first gen_bs samples of each batch (0: all of them)
caption_p = 0.0  # share of understanding samples asked to describe the image instead (answer: its caption);
#   the base recipe uses it: a caption names every object's colour, shape and place, a one-word answer only one
w_vq = 0.0  # VQ reconstruction + codebook loss (training the VQ model)
vq_iters = 0  # scratch: the first vq_iters steps train the VQ model (and no LM objective), then it is frozen
aligner_init_scale = 1.0  # scratch: the aligner's last layer starts this much smaller (README: base model)
vision_pos_init_scale = 1.0  # scratch: SigLIP's position embeddings start this much larger (README: base model)
vision_labels_iters = 0  # scratch, built-in world: the first steps also pretrain SigLIP to name each object's colour and
#   shape (a linear head on the features pooled over the object's half of the image, dropped afterwards): the tiny
#   base's stand-in for the pretrained SigLIP that Janus-Pro starts from (README: base model)
# the game (game=False: the SFT baseline, same data, steps and optimizer)
game = True
adversary = "learned"  # 'learned': the perturber plays | 'random': the control arm -- random directions at eps_max
#   through the same encode-project-decode path and buffer, so the understanding branch sees decoded images, unaimed
perturb_at = "vq"  # 'vq': codebook-space tokens, projected and decoded | 'aligner': tokens after the aligner
mine = "decode"  # 'decode': this batch's decoded adversarial images | 'generate': images the model generates
eps_relative = True  # budget relative to each token's norm (scale-free); False: absolute (published: LM space)
eps_min = 0.0
eps_max = 0.3  # codebook tokens are unit vectors: a random delta of 0.3 flips most codes of the base, yet keeps shapes readable
eps_init = 0.15
lam = 100.0  # λ: weight of the adversarial cross-entropy in the perturber's loss
lr_G = 1e-2  # the perturber's AdamW learning rate (weight decay 0)
w_l2, w_tv, w_eps = 1e-3, 1e-3, 1e-3  # R(delta): L2, total variation over the token grid, eps^2
mine_stride = 1  # mine every this many steps
cand_k = 2  # candidates per sample (decode: perturber draws with jitter; generate: generated images)
cand_noise = 0.3  # direction jitter of the extra decode candidates
q_hard = 0.75  # keep candidates with H >= this batch quantile
hard_topk = 2  # at most this many candidates per source sample
tau = 0.9  # consistency threshold on s
lambda_c = 1.0  # H = CE + lambda_c * max(0, tau - s)
clip_path = ""  # a local CLIP directory: s = CLIP image-text cosine; '': built in (cosine to the real image, in the model's own embedding)
buffer_rule = "consistent"  # 'consistent': drop s < tau | 'published': keep them as hard too
buffer_capacity = 4096
buffer_temperature = 1.75
hard_bs = 8  # hard samples per understanding step
gen_cfg = 1.0  # mine='generate': classifier-free guidance (1: none; the shipped base has no unconditional branch)
gen_temperature = 1.0
# optimisation
batch_size = 16  # per process
max_iters = 300
lr = 5e-4
min_lr = 5e-5
warmup_iters = 20
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA
compile = torch.cuda.is_available()
threads = 0  # CPU threads for torch (0: torch's default)
ddp_check_interval = 0  # debug: every this many steps, check that all ranks hold identical trained parameters
ddp_timeout_s = 600  # a collective waiting longer fails: a stuck rank ends the job instead of hanging it (rank 0 evaluates alone meanwhile)
max_bad_steps = 20  # a non-finite loss or gradient skips that update; this many in a row stop the run
debug_nan_at = ""  # test hook: comma list of iterations (numbered as logged, from 1) whose losses are made NaN
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (int, float, bool, str))}
# -----------------------------------------------------------------------------------------------

# start-up checks: impossible settings stop here, all of them named, before any data or weights are read
parts = ("vision", "aligner", "lm", "gen", "vq")  # what train_modules can name (fully trained groups of modules)
chosen = list(parts) if train_modules == "all" else [g for g in train_modules.split(",") if g]
try:
    debug_nan = {int(i) for i in debug_nan_at.split(",") if i.strip()}
except ValueError:
    debug_nan = None
n_procs = int(os.environ.get("WORLD_SIZE", 1))
at_least = dict(max_iters=1, batch_size=1, hard_bs=0, lora_r=0, vq_iters=0, cand_k=1, hard_topk=1, mine_stride=1, buffer_capacity=1,
                eval_n=1, log_interval=1, ckpt_interval=1, max_bad_steps=1, eval_interval=0, ddp_check_interval=0, num_workers=0, threads=0)
problems = [f"{k}={globals()[k]}: must be >= {least}" for k, least in at_least.items() if globals()[k] < least]
problems += [msg for bad, msg in [
    (not 0 <= q_hard <= 1, f"q_hard={q_hard}: a quantile, must lie in [0, 1]"),
    (not 0 <= eps_min < eps_init < eps_max, f"eps_min={eps_min}, eps_init={eps_init}, eps_max={eps_max}: need 0 <= eps_min < eps_init < eps_max"),
    (vq_iters > max_iters, f"vq_iters={vq_iters}: more than max_iters={max_iters}"),
    (vision_labels_iters and (dataset != "shapes" or "vision" not in chosen),
     f"vision_labels_iters={vision_labels_iters} trains the vision tower on the built-in world's labels: needs dataset='shapes' and 'vision' in train_modules"),
    ((vq_iters or w_vq) and "vq" not in chosen, f"vq_iters={vq_iters}, w_vq={w_vq} train the VQ model, but train_modules={train_modules!r} leaves it frozen: add 'vq'"),
    (lora_r == 0 and not chosen, "nothing trains: lora_r=0 and train_modules='': set train_modules and/or lora_r"),
    (set(chosen) - set(parts), f"train_modules={train_modules!r}: unknown part(s) {sorted(set(chosen) - set(parts))}; parts: {', '.join(parts)} or 'all'"),
    (not 0 <= lora_dropout < 1, f"lora_dropout={lora_dropout}: must lie in [0, 1)"),
    (perturb_at not in ("vq", "aligner"), f"perturb_at={perturb_at!r}: expected 'vq' or 'aligner'"),
    (mine not in ("decode", "generate"), f"mine={mine!r}: expected 'decode' or 'generate'"),
    (buffer_rule not in ("consistent", "published"), f"buffer_rule={buffer_rule!r}: expected 'consistent' or 'published'"),
    (adversary not in ("learned", "random"), f"adversary={adversary!r}: expected 'learned' or 'random'"),
    (buffer_temperature <= 0, f"buffer_temperature={buffer_temperature}: must be > 0"),
    (clip_path and perturb_at != "vq", "clip_path scores images, but perturb_at='aligner' candidates are not images: use perturb_at='vq'"),
    (clip_path and not os.path.isdir(clip_path), f"clip_path={clip_path!r}: no such directory"),
    (not 0 <= gen_uncond_p <= 1, f"gen_uncond_p={gen_uncond_p}: a probability, must lie in [0, 1]"),
    (export_dtype not in ("float32", "float16", "bfloat16"), f"export_dtype={export_dtype!r}: expected 'float32', 'float16' or 'bfloat16'"),
    (load_dtype not in ("float32", "float16", "bfloat16"), f"load_dtype={load_dtype!r}: expected 'float32', 'float16' or 'bfloat16'"),
    (load_dtype != "float32" and chosen, f"load_dtype={load_dtype!r} with train_modules={train_modules!r}: fully trained parts need float32 weights (AdamW steps vanish in 16 bits); only LoRA may train on 16-bit weights"),
    (dtype not in ("float32", "float16", "bfloat16"), f"dtype={dtype!r}: expected 'float32', 'float16' or 'bfloat16'"),
    (device.startswith("cuda") and not torch.cuda.is_available(), f"device={device!r}, but CUDA is not available here"),
    (dataset not in ("shapes", "vqav2", "jsonl"), f"dataset={dataset!r}: expected 'shapes', 'vqav2' or 'jsonl'"),
    (dataset == "shapes" and train_n < batch_size * n_procs, f"train_n={train_n}: fewer samples than one global batch, batch_size*world_size={batch_size}*{n_procs}"),
    (dataset == "jsonl" and not os.path.isfile(jsonl_path), f"dataset='jsonl': jsonl_path={jsonl_path!r} is not a file"),
    (dataset == "vqav2" and not (os.path.isfile(vqav2_questions) and os.path.isfile(vqav2_annotations) and os.path.isdir(vqav2_images)),
     f"dataset='vqav2': need the files vqav2_questions={vqav2_questions!r}, vqav2_annotations={vqav2_annotations!r} and the folder vqav2_images={vqav2_images!r}"),
    (init_from not in ("scratch", "resume") and not os.path.isfile(os.path.join(init_from, "config.json")),
     f"init_from={init_from!r}: expected 'scratch', 'resume' or a Hugging Face model directory (it has no config.json)"),
    (ddp_timeout_s <= 0, f"ddp_timeout_s={ddp_timeout_s}: must be > 0"),
    (grad_clip <= 0, f"grad_clip={grad_clip}: must be > 0"),
    (debug_nan is None, f"debug_nan_at={debug_nan_at!r}: expected a comma list of iterations, e.g. '3,5'"),
] if bad]
if problems:
    raise SystemExit("\n".join(f"config error: {p}" for p in problems))

# distributed set-up from torchrun's environment; one process otherwise
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    # with a timeout, a collective whose peers died or hung raises instead of waiting forever; an exception on
    # any rank ends that process with a non-zero code, and torchrun then stops the others
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=ddp_timeout_s))
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)  # every rank builds identical LoRA and perturber weights; reseeded per rank below
device_type = "cuda" if device.startswith("cuda") else "cpu"
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == "cuda" else nullcontext()
if master:
    os.makedirs(out_dir, exist_ok=True)


# ---- where training starts: a checkpoint to resume, or weights (both checked before anything loads) --
def read_checkpoint_file(path, size=None):
    """A checkpoint file: JSON, or the tensors of a safetensors file. A missing, truncated (its size is not
    the `size` ckpt.json recorded) or corrupt file stops the run with one line naming it."""
    try:
        if size is not None and os.path.getsize(path) != size:
            raise ValueError(f"{os.path.getsize(path)} bytes where ckpt.json recorded {size}: truncated?")
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return load_file(path)
    except Exception as e:  # OSError, JSONDecodeError, SafetensorError, ...: one line, not a stack trace
        raise SystemExit(f"cannot resume: {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None


def weight_names(path):
    """Names of the tensors in a Hugging Face directory's safetensors files, read from their headers alone."""
    names = set()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), "pt") as f:
                    names.update(f.keys())
            except Exception as e:
                raise SystemExit(f"cannot read {os.path.join(path, name)}: {type(e).__name__}: {e}") from None
    return names


ckpt_dir = os.path.join(out_dir, "ckpt")
resume = init_from == "resume"
if resume:
    # save_checkpoint swaps a new checkpoint in by two renames (ckpt -> ckpt.old, ckpt.tmp -> ckpt): a kill
    # between them leaves only ckpt.old, which is then the newest complete one
    resume_dir = ckpt_dir
    if not os.path.exists(os.path.join(ckpt_dir, "ckpt.json")) and os.path.isdir(ckpt_dir + ".old"):
        resume_dir = ckpt_dir + ".old"
    ckpt_meta = read_checkpoint_file(os.path.join(resume_dir, "ckpt.json"))
    lacking = {"iter_num", "base", "world_size", "sizes", "bad_in_row"} - set(ckpt_meta)
    if lacking:
        raise SystemExit(f"cannot resume: {resume_dir}/ckpt.json lacks {sorted(lacking)} (written by an older train.py?)")
    base = ckpt_meta["base"]
    if ckpt_meta["world_size"] != world_size:
        raise SystemExit(f"cannot resume: {resume_dir} was written by {ckpt_meta['world_size']} processes, this run has {world_size}: "
                         "each rank's hard buffer, RNG and place in the data resume exactly only with the same number")
else:
    base = init_from
if base != "scratch":  # what the weights hold, read from the safetensors headers before loading them
    held = weight_names(base)  # empty for a directory without safetensors files: then nothing is checked here
    if held and game and mine == "generate" and not any(".generation_head." in n for n in held):
        raise SystemExit(f"config error: mine='generate' needs a generation head, but {base} has no generation_head weights")
    if held and game and perturb_at == "vq" and not any(".vqmodel." in n for n in held):
        raise SystemExit(f"config error: perturb_at='vq' needs the VQ model, but {base} has no vqmodel weights: use perturb_at='aligner'")

# ---- data -------------------------------------------------------------------------------------
if dataset == "shapes":
    records = data.shapes_world("train", train_n, seed=0)
    eval_records = data.shapes_world("test", eval_n, seed=0)
else:  # real files: a bad record stops the run with its file and line named (or is skipped: skip_bad)
    try:
        if dataset == "vqav2":
            records = data.load_vqav2(vqav2_questions, vqav2_annotations, vqav2_images, skip_bad=skip_bad)
        else:
            records = data.load_jsonl(jsonl_path, skip_bad=skip_bad)
    except data.BadData as e:
        raise SystemExit(f"data error: {e}") from None
    eval_records = records[:eval_n]  # a held-out VQAv2 split is eval.py's job
if len(records) < batch_size * world_size:
    raise SystemExit(f"config error: {len(records)} training samples, fewer than batch_size*world_size={batch_size * world_size}")
if w_gen and not all(r["caption"] for r in records):
    raise SystemExit(f"config error: w_gen={w_gen} needs a caption on every training sample; "
                     f"{sum(not r['caption'] for r in records)} have none (set w_gen=0)")
loader = data.make_loader(data.Records(records, skip_bad=skip_bad), batch_size, shuffle=True, seed=seed,
                          num_workers=num_workers)

# ---- model ------------------------------------------------------------------------------------
if base == "scratch":
    texts = [s["question"] for s in records] + [s["caption"] for s in records] + [a for s in records for a in s["answers"]] + [data.DESCRIBE]
    tok = build_tokenizer(texts, tokenizer_vocab)
    umm = UMM.from_config(tiny_config(tok, lm_layers=lm_layers, vision_layers=vision_layers), tok, aligner_init_scale=aligner_init_scale, pos_init_scale=vision_pos_init_scale)
else:
    umm = UMM.from_pretrained(base, dtype=getattr(torch, load_dtype))
umm.to(device)
if gradient_checkpointing:
    umm.janus.gradient_checkpointing_enable()

# what trains: named groups of Janus modules, fully, plus LoRA on the LM projections
jm = umm.janus.model
groups = {"vision": [jm.vision_model], "aligner": [jm.aligner], "lm": [jm.language_model, umm.janus.lm_head],
          "gen": [jm.generation_embeddings, jm.generation_aligner, jm.generation_head], "vq": [jm.vqmodel]}
umm.requires_grad_(False)
for g in chosen:
    for m in groups[g]:
        m.requires_grad_(True)
if lora_r:
    add_lora(jm.language_model, lora_r, lora_alpha, lora_dropout)  # LoRA parameters require grad
params = {n: p for n, p in umm.named_parameters() if p.requires_grad}
if vision_labels_iters:  # the pretraining head: trained and checkpointed with the rest, never exported
    vision_head = torch.nn.Linear(jm.config.vision_config.hidden_size, len(data.COLORS) + len(data.SHAPES)).to(device)
    params.update({f"vision_head.{n}": p for n, p in vision_head.named_parameters()})
if not params:
    raise SystemExit("config error: nothing trains: set train_modules and/or lora_r")
decay = [p for n, p in params.items() if p.dim() >= 2]
no_decay = [p for n, p in params.items() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(beta1, beta2))

# the adversary: a perturber at the visual-token interface, its optimizer, and the hard buffer
token_dim = umm.codebook.shape[1] if perturb_at == "vq" else umm.janus.config.text_config.hidden_size
perturber = Perturber(token_dim, eps_min=eps_min, eps_max=eps_max, eps_init=eps_init, relative=eps_relative).to(device)
opt_G = torch.optim.AdamW(perturber.parameters(), lr=lr_G, weight_decay=0.0)


def vision_label_loss(h, attrs, logs):
    """vision_labels_iters: cross-entropy of each object's colour and shape, read by vision_head from SigLIP's features
    h (B, N, D) averaged over the patches of the object's box (data.object_labels)."""
    g = int(h.shape[1] ** 0.5)
    h, cell = h.view(len(attrs), g, g, -1), data.SIZE // g
    feats, colors, shapes = [], [], []
    for i, a in enumerate(attrs):
        for (x0, y0, x1, y1), c, s in data.object_labels(a):
            feats.append(h[i, y0 // cell:y1 // cell, x0 // cell:x1 // cell].mean((0, 1)))
            colors.append(c)
            shapes.append(s)
    logits, nc = vision_head(torch.stack(feats)).float(), len(data.COLORS)
    ce_c = F.cross_entropy(logits[:, :nc], torch.tensor(colors, device=device))
    ce_s = F.cross_entropy(logits[:, nc:], torch.tensor(shapes, device=device))
    logs.update(vis_color=ce_c.item(), vis_shape=ce_s.item())
    return ce_c + ce_s


def draw_delta(z, noise_std=0.0):
    """A perturbation of tokens z inside the budget: the perturber's (directions jittered by noise_std), or
    in the control arm (adversary='random') a uniformly random direction at the full budget eps_max."""
    if adversary == "random":
        return random_like(z, eps_max, eps_relative)
    return perturber(z, noise_std=noise_std)
buffer = HardBuffer(buffer_capacity, buffer_temperature)  # per rank: each process mines and trains on its own
grid = (umm.grid, umm.grid)
clip_score = clip_scorer(clip_path, device) if clip_path else None
if compile:
    jm.language_model.compile()
    jm.vision_model.compile()
if master:
    n_all = sum(p.numel() for p in umm.parameters())
    print(f"model: {base} | {n_all / 1e6:.2f}M parameters, {sum(p.numel() for p in params.values()) / 1e6:.2f}M trained "
          f"({', '.join(chosen) or 'none'}{' + LoRA r=%d' % lora_r if lora_r else ''}) | {world_size} process(es) on {device}")
    if game:
        n_G = sum(p.numel() for p in perturber.parameters())
        print(f"game: perturb_at={perturb_at}, mine={mine}, perturber {n_G} parameters ({100 * n_G / n_all:.2f}% of the model), "
              f"eps in [{eps_min}, {eps_max}] {'relative to token norm' if eps_relative else 'absolute'}")


def lr_at(it):
    """Linear warm-up, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def sync_grads(tensors):
    """Average gradients over processes (raw DDP: one all-reduce per bucket of flat gradients)."""
    if not ddp:
        return
    grads = [p.grad for p in tensors if p.grad is not None]
    for i in range(0, len(grads), 64):
        bucket = grads[i:i + 64]
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        flat /= world_size
        for g, f in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(f.view_as(g))


def check_ranks_agree(it):
    """Debug (ddp_check_interval): every rank must hold exactly rank 0's trained parameters (LoRA / modules
    and the perturber), bit for bit. A rank that drifted stops the job, naming the ranks and the first tensor."""
    named = {**params, **{f"perturber.{n}": p for n, p in perturber.named_parameters()}}
    flat = torch.cat([p.detach().flatten().float() for p in named.values()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    differs = [torch.zeros(1, device=flat.device) for _ in range(world_size)]
    dist.all_gather(differs, torch.tensor([float(not torch.equal(flat, ref))], device=flat.device))
    drifted = [r for r, d in enumerate(differs) if d.item()]
    if drifted:
        sizes = [p.numel() for p in named.values()]
        first = next((n for n, a, b in zip(named, flat.split(sizes), ref.split(sizes)) if not torch.equal(a, b)), None)
        raise RuntimeError(f"iter {it}: ranks {drifted} hold trained parameters different from rank 0's"
                           + (f" (here, rank {rank}: first {first})" if first else ""))
    if master:
        tqdm.write(f"iter {it}: parameters identical on all {world_size} ranks")


def nonfinite(**values):
    """The non-finite ones among these tensors, as 'name=value', e.g. ['loss=nan']. Ranks agree: when any
    rank finds one, every rank gets a non-empty list and skips the update, so they stay in step."""
    found = [f"{k}={v.item():.3g}" for k, v in values.items() if not torch.isfinite(v).all()]
    if ddp:
        anywhere = torch.tensor([float(bool(found))], device=device)
        dist.all_reduce(anywhere)
        if anywhere.item() and not found:
            found = ["on another rank"]
    return found


def optimizer_tensors(opt, names, prefix):
    st = opt.state_dict()["state"]
    return {f"{prefix}{names[i]}.{k}": v.contiguous().cpu() for i, s in st.items() for k, v in s.items()}


def load_optimizer(opt, names, prefix, tensors):
    sd = opt.state_dict()
    for i, n in enumerate(names):
        st = {k[len(prefix + n) + 1:]: v.to(device) for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix + n}
        if st:
            sd["state"][i] = st
    opt.load_state_dict(sd)


def stop(message):
    """End the run mid-loop with one line, printed after the progress bar so that it is the last one."""
    bar.close()
    raise SystemExit(message)


def fsync(path):
    """Flush a file, or a directory's list of entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(it):
    """out_dir/ckpt: state.safetensors (trained tensors and the perturber), optim.safetensors (both AdamW
    states), what each process r alone holds: buffer{r}.safetensors + buffer{r}.json (its hard buffer),
    rank{r}.safetensors (its RNG states) + rank{r}.json (its place in the data, the samples it skipped),
    then ckpt.json (step, config, counters, file sizes) and model/ (the merged model in HF format).
    Called on every rank; rank r writes its own files, rank 0 the rest.
    Atomic: all goes to ckpt.tmp, is flushed to disk, and only then replaces ckpt, by renames (ckpt -> ckpt.old,
    ckpt.tmp -> ckpt), so a kill at any moment leaves a complete checkpoint: ckpt, or between the renames ckpt.old."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    named = {**params, **{f"perturber.{n}": p for n, p in perturber.named_parameters()}}
    bad = [n for n, p in named.items() if not torch.isfinite(p).all()]
    if any(not torch.isfinite(v).all() for o in (optimizer, opt_G) for s in o.state.values() for v in s.values()):
        bad.append("optimizer moments")
    if bad:  # every rank holds the same parameters, so every rank stops here
        stop(f"iter {it}: not writing a checkpoint with non-finite values (in {bad[:3]}); {ckpt_dir} is left as it was")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # what a kill during an earlier save left
        os.makedirs(tmp)
    if ddp:
        dist.barrier()
    bs = buffer.state_dict()  # items' tensors in safetensors as "{item index}.{key}", the rest of them in JSON
    save_file({"H": bs["H"], **{f"{i}.{k}": v.contiguous() for i, item in enumerate(bs["items"]) for k, v in item.items()
                                if torch.is_tensor(v)}}, os.path.join(tmp, f"buffer{rank}.safetensors"))
    with open(os.path.join(tmp, f"buffer{rank}.json"), "w") as f:
        json.dump([{k: v for k, v in item.items() if not torch.is_tensor(v)} for item in bs["items"]], f)
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device_type == "cuda" else {})}
    save_file(rng, os.path.join(tmp, f"rank{rank}.safetensors"))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"data_position": data_position, "skipped": skipped}, f)
    if ddp:
        dist.barrier()  # every rank's files are written
    if not master:
        return
    save_file({n: p.detach().contiguous().cpu() for n, p in named.items()}, os.path.join(tmp, "state.safetensors"))
    moments = optimizer_tensors(optimizer, list(params), "")
    moments.update(optimizer_tensors(opt_G, [n for n, _ in perturber.named_parameters()], "perturber."))
    save_file(moments, os.path.join(tmp, "optim.safetensors"))
    umm.save_pretrained(os.path.join(tmp, "model"))
    if game:  # the perturber alone beside the merged model: perturber.safetensors + perturber.json
        save_perturber(perturber, os.path.join(tmp, "model"), perturb_at=perturb_at)
    sizes = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if os.path.isfile(os.path.join(tmp, f))}
    meta = {"iter_num": it, "config": config, "base": base, "world_size": world_size, "bad_steps": bad_steps,
            "bad_in_row": bad_in_row, "sizes": sizes, "model": "model", "buffer": ["buffer0.safetensors", "buffer0.json"]}
    with open(os.path.join(tmp, "ckpt.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for folder, _, files in os.walk(tmp):  # on disk before the swap: a rename must never expose unwritten data
        for f in files:
            fsync(os.path.join(folder, f))
        fsync(folder)
    if os.path.isdir(ckpt_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    fsync(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint():
    """What save_checkpoint wrote, from resume_dir, into the parameters, both optimizers, this rank's buffer
    and RNG. Returns the loop's state: (iter_num, data_position, skipped, bad_steps, bad_in_row)."""
    def read(name):
        return read_checkpoint_file(os.path.join(resume_dir, name), ckpt_meta["sizes"].get(name))
    state = read("state.safetensors")
    named = {**params, **{f"perturber.{n}": p for n, p in perturber.named_parameters()}}
    wrong = [n for n in named if n not in state or state[n].shape != named[n].shape]
    if wrong:
        raise SystemExit(f"cannot resume: {resume_dir}/state.safetensors: no tensor of the right shape for {wrong[:3]} "
                         "(trained with other lora_r / train_modules / perturb_at?)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state[n])
    moments = read("optim.safetensors")
    load_optimizer(optimizer, list(params), "", moments)
    load_optimizer(opt_G, [n for n, _ in perturber.named_parameters()], "perturber.", moments)
    tensors, items = read(f"buffer{rank}.safetensors"), read(f"buffer{rank}.json")
    for k, v in tensors.items():  # "{item index}.{key}" -> that item's tensor
        if k != "H":
            i, key = k.split(".", 1)
            items[int(i)][key] = v
    buffer.load_state_dict({"capacity": buffer_capacity, "temperature": buffer_temperature, "H": tensors["H"], "items": items})
    rng, info = read(f"rank{rank}.safetensors"), read(f"rank{rank}.json")
    torch.set_rng_state(rng["cpu"])
    if device_type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return (ckpt_meta["iter_num"], tuple(info["data_position"]), [tuple(s) for s in info["skipped"]],
            ckpt_meta["bad_steps"], ckpt_meta["bad_in_row"])


def summary():
    """Clean accuracy and accuracy under the current perturber on the evaluation samples."""
    umm.eval()
    res = {"clean": understanding_accuracy(umm, eval_records, progress=False)}
    if game:
        res["under_perturber"] = understanding_accuracy(umm, eval_records, perturbed_embed(umm, perturber, perturb_at), progress=False)
    return res


torch.manual_seed(seed + rank)  # from here on, dropout and the mining jitter differ between ranks
# the loop's own state; a checkpoint holds it all, so a resumed run goes on exactly as an uninterrupted one
iter_num, data_position, skipped, bad_steps, bad_in_row = 0, (0, 0), [], 0, 0
if resume:  # parameters, both optimizers, and this rank's hard buffer, RNG state and place in the data
    iter_num, data_position, skipped, bad_steps, bad_in_row = load_checkpoint()
log_path = os.path.join(out_dir, "log.jsonl")
if resume and master and os.path.exists(log_path):  # the log as of the checkpoint, so that it reads as one run:
    lines = []  # the lines the killed run wrote after its checkpoint go, and so does one torn by the kill
    for line in open(log_path):
        try:
            if line.endswith("\n") and json.loads(line).get("iter", 0) <= iter_num:
                lines.append(line)
        except json.JSONDecodeError:
            pass
    with open(log_path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(log_path + ".tmp", log_path)
batches = data.infinite_batches(loader, *data_position)  # (epoch, batch): the shuffled order goes on where it stood
before = summary() if master and not resume else None

# ---- the loop ---------------------------------------------------------------------------------
bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
t0 = time.time()
while iter_num < max_iters:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(iter_num)
    try:
        batch = next(batches)
    except data.BadData as e:  # skip_bad=False: an image that does not decode stops the run, named (the last
        # line of the message: from a DataLoader worker it comes after the worker's traceback)
        stop(f"data error: {str(e).strip().splitlines()[-1].split('BadData: ', 1)[-1]} "
             "(skip_bad=True skips and counts such samples)")
    data_position = batch["position"]
    skipped += batch["skipped"]
    if not batch["images"]:  # every sample of this batch was unreadable (skip_bad): counted above, draw another
        continue
    pixels = umm.preprocess(batch["images"])
    questions, captions, B = batch["questions"], batch["captions"], len(batch["questions"])
    answers = [max(a, key=a.count) for a in batch["answers"]]  # the annotators' most common answer (first on ties)
    if caption_p:
        describe = [bool(c) and torch.rand(()).item() < caption_p for c in captions]
        questions = [data.DESCRIBE if d else q for d, q in zip(describe, questions)]
        answers = [c if d else a for d, c, a in zip(describe, captions, answers)]
    umm.train()
    logs, bad_G = {}, []
    poisoned = iter_num + 1 in debug_nan  # the debug_nan_at test hook: this step's losses are made NaN

    if game:
        with ctx:
            # 1. encode the images to the tokens the game is played on
            with torch.no_grad():
                tokens = umm.visual_tokens(pixels, perturb_at)
            # 2. perturb them, inside the budget
            delta = draw_delta(tokens)
            # 3. project onto the decoder's manifold (nearest codebook entries, straight-through) and decode
            emb_adv, px_adv = umm.perturbed_view(tokens + delta, perturb_at)
            # 4. the perturber's move: maximise the understanding loss on what it made, minus R(delta)
            ce_adv = umm.answer_loss(emb_adv, questions, answers)
            loss_G = -lam * ce_adv.mean() + regularizer(delta, perturber.eps, w_l2, w_tv, w_eps, grid)
            if poisoned:
                loss_G = loss_G * float("nan")  # NaN loss and NaN gradients
        if adversary == "learned":  # the control arm's random directions have nothing to learn
            # gradients for the perturber only: the LM takes no weight gradients in this pass
            for p, g in zip(perturber.parameters(), torch.autograd.grad(loss_G, list(perturber.parameters()))):
                p.grad = g
            sync_grads(perturber.parameters())
            grad_norm_G = torch.nn.utils.clip_grad_norm_(perturber.parameters(), grad_clip)
            bad_G = nonfinite(loss_G=loss_G.detach(), grad_norm_G=grad_norm_G)
            if not bad_G:  # a NaN / inf loss or gradient: this update is skipped (counted below)
                opt_G.step()
            opt_G.zero_grad(set_to_none=True)
        logs.update(loss_G=loss_G.item(), adv=ce_adv.mean().item(), eps=perturber.eps.item())

        # 5. mine: candidates, their consistency with the text, the hardest kept in the buffer
        if iter_num % mine_stride == 0 and not bad_G:  # not from a pass that went non-finite
            with torch.no_grad(), ctx:
                ref = umm.image_embeds(pixels).mean(1)  # s is measured against the real image of the same text
                cands = []  # (understanding embeds, pixels, CE, what the buffer stores of each candidate)
                if mine == "decode":  # this batch's adversarial images, plus jittered draws of the perturber
                    clean_u8 = umm.to_uint8(pixels) if perturb_at == "aligner" else None
                    for k in range(cand_k):
                        t = tokens + (delta.detach() if k == 0 else draw_delta(tokens, cand_noise))
                        e, px = (emb_adv.detach(), px_adv) if k == 0 else umm.perturbed_view(t, perturb_at)
                        ce = ce_adv.detach() if k == 0 else umm.answer_loss(e, questions, answers)
                        store = ({"codes": umm.project_to_codebook(t)[1]} if perturb_at == "vq" else
                                 {"image": clean_u8, "delta": (t - tokens).half()})
                        cands.append((e, px, ce, store))
                else:  # 'generate': the generation branch draws images of the text, the perturber steering each token
                    prompts = [c or q for c, q in zip(captions, questions)]
                    for k in range(cand_k):
                        hook = (lambda v: v + draw_delta(v)) if perturb_at == "vq" else None
                        codes = umm.generate_images(prompts, gen_cfg, gen_temperature, token_hook=hook)
                        px = umm.decode_codes(codes).clamp(-1, 1)
                        e = umm.image_embeds(px)
                        if perturb_at == "vq":
                            store = {"codes": codes}
                        else:
                            d = draw_delta(e, cand_noise)
                            e, store = e + d, {"image": umm.to_uint8(px), "delta": d.half()}
                        cands.append((e, px, umm.answer_loss(e, questions, answers), store))
                ce = torch.cat([c[2] for c in cands]).float()
                if clip_score:  # consistency of each candidate image with its text
                    texts = [c or f"{q} {a}" for c, q, a in zip(captions, questions, answers)] * cand_k
                    s = clip_score(torch.cat([c[1] for c in cands]).float() * umm.image_std + umm.image_mean, texts)
                else:  # built in: how far the candidate drifted from the real image, in the model's own embedding
                    s = F.cosine_similarity(torch.cat([c[0].mean(1) for c in cands]).float(), ref.float().repeat(cand_k, 1))
                H = hardness(ce, s, lambda_c, tau)
                keep = select_hard(H, s, torch.arange(B, device=device).repeat(cand_k), q_hard, hard_topk, tau, buffer_rule)
                items = []
                for j in keep.tolist():
                    k, i = divmod(j, B)
                    # clone: an item owns its tensors, rather than keeping its whole batch alive as a view
                    items.append({**{key: v[i].cpu().clone() for key, v in cands[k][3].items()},
                                  "question": questions[i], "answer": answers[i], "source": batch["sources"][i]})
                buffer.push(H[keep].cpu(), items)
            logs.update(s=s.mean().item(), kept=len(items), buffer=len(buffer))

    # 6. the understanding step: w_clean * CE(clean) + CE(hard samples from the buffer), one backward
    hard = buffer.sample(hard_bs) if game else []
    with ctx:
        loss = 0.0
        if iter_num < vq_iters or w_vq > 0:
            rec, cb, _ = umm.vq_losses(pixels)
            loss = rec + cb
            logs.update(rec=rec.item(), codebook=cb.item())
        feats = umm.vision_features(pixels) if iter_num < vision_labels_iters or iter_num >= vq_iters else None
        if iter_num < vision_labels_iters:  # SigLIP's labels, from the features the understanding step uses too
            loss = loss + vision_label_loss(feats, batch["attrs"], logs)
        if iter_num >= vq_iters:  # the VQ model learns alone first, so that generation's targets (its codes) hold still
            emb = jm.aligner(feats)
            if hard:
                emb = torch.cat([emb, umm.buffered_embeds(hard)])
            ce = umm.answer_loss(emb, questions + [h["question"] for h in hard], answers + [h["answer"] for h in hard])
            loss = loss + w_clean * ce[:B].mean() + (ce[B:].mean() if hard else 0.0)
            logs["und"] = ce[:B].mean().item()
            if hard:
                logs["hard"] = ce[B:].mean().item()
            if w_gen:
                n = min(gen_bs or B, B)
                with torch.no_grad():
                    codes = umm.image_codes(pixels[:n])
                ce_gen = umm.image_loss(captions[:n], codes, torch.rand(n) < gen_uncond_p).mean()
                loss = loss + w_gen * ce_gen
                logs["gen"] = ce_gen.item()
    if poisoned:
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sync_grads(params.values())
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    bad_D = nonfinite(loss=loss.detach(), grad_norm=grad_norm)
    if not bad_D:  # skipped, like the perturber's, on a non-finite loss or gradient
        optimizer.step()
    iter_num += 1
    bar.update(1)
    # non-finite steps: each is counted and logged; max_bad_steps in a row stop the run. The skipped updates left
    # the parameters as they were, so the checkpoints (never written with non-finite values) are good ones.
    bad = bad_G + bad_D
    bad_steps += bool(bad)
    bad_in_row = bad_in_row + 1 if bad else 0
    if bad and master:
        with open(log_path, "a") as f:
            f.write(json.dumps({"iter": iter_num, "skipped_update": bad, "bad_steps": bad_steps}) + "\n")
    if bad_in_row >= max_bad_steps:
        msg = (f"stopping at iter {iter_num}: {bad_in_row} steps in a row with non-finite values (this one: {', '.join(bad)}); "
               f"their updates were skipped, and the last checkpoint, {ckpt_dir}, is intact")
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"iter": iter_num, "stopped": msg}) + "\n")
        stop(msg)
    if ddp and ddp_check_interval and iter_num % ddp_check_interval == 0:
        check_ranks_agree(iter_num)

    if master and (iter_num % log_interval == 0 or iter_num == max_iters):
        logs = {"iter": iter_num, "lr": lr_at(iter_num - 1), "loss": loss.item(), "grad_norm": grad_norm.item(), **logs,
                "bad_steps": bad_steps, "skipped": len(skipped), "time": round(time.time() - t0, 1)}
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("und", "loss_G", "eps", "buffer", "gen", "rec")
                         or k in ("bad_steps", "skipped") and v})
        with open(log_path, "a") as f:
            f.write(json.dumps(logs) + "\n")
    if master and ((eval_interval and iter_num % eval_interval == 0) or iter_num == max_iters):
        umm.eval()
        res = evaluate(umm, eval_records, gen_n=eval_n // 4 if dataset == "shapes" and w_gen else 0, progress=False)
        bar.write(f"iter {iter_num}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        with open(log_path, "a") as f:
            f.write(json.dumps({"iter": iter_num, "eval": res}) + "\n")
    if iter_num % ckpt_interval == 0 or iter_num == max_iters:
        save_checkpoint(iter_num)  # on every rank: each writes its own buffer, RNG and place in the data
bar.close()

n_skipped = torch.tensor(len(skipped), device=device)
if ddp:  # every rank skips its own
    dist.all_reduce(n_skipped)
if master:
    if n_skipped or data.skipped:  # images that did not decode in training | records dropped when the data was read
        print(f"skipped {n_skipped.item()} unreadable images in training{f' (first: {skipped[:3]})' if skipped else ''}"
              f" and {len(data.skipped)} bad records when reading the data")
    if bad_steps:
        print(f"skipped the updates of {bad_steps} steps with non-finite losses or gradients (see {log_path})")
    if export_dir:
        umm.save_pretrained(export_dir, dtype=getattr(torch, export_dtype))
        if game:
            save_perturber(perturber, export_dir, perturb_at=perturb_at)
        print(f"exported the model{' and the perturber' if game else ''} to {export_dir}")
    after = summary()
    print(f"done: {iter_num} iterations in {time.time() - t0:.0f}s; checkpoint in {ckpt_dir}")
    print(f"{'accuracy on ' + str(len(eval_records)) + ' eval samples':<34}{'before':>8}{'after':>8}")
    for k in after:
        print(f"{k:<34}{before[k] if before else float('nan'):>8.3f}{after[k]:>8.3f}")
    with open(log_path, "a") as f:
        f.write(json.dumps({"iter": iter_num, "summary": {"before": before, "after": after}}) + "\n")
if ddp:
    dist.destroy_process_group()
