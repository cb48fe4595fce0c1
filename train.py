"""
UniGame training: one explicit loop, read top to bottom.

    python train.py                                      # UniGame post-training of assets/shapes-base
    python train.py config/base_shapes.py                # rebuild the base model from scratch (SFT)
    python train.py --game=False                         # the SFT baseline: same data, steps, optimizer
    torchrun --nproc_per_node=8 train.py config/unigame_janus_pro_7b.py

Every module-level name below is a configuration key; config/*.py files and --key=value flags
override them (configurator.py). Unknown keys are errors.
"""

import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from eval import evaluate
from model import UMM, add_lora, build_tokenizer, tiny_config

# -----------------------------------------------------------------------------------------------
# configuration
# I/O
out_dir = "out"
init_from = "assets/shapes-base"  # 'scratch' | 'resume' | a local Hugging Face directory
export_dir = ""  # when set, the final model is also written there (merged LoRA, HF format)
export_dtype = "float32"  # dtype of exported weights: float32 | float16 | bfloat16
log_interval = 10
eval_interval = 250  # 0: evaluate only at the end
eval_n = 256  # test samples per evaluation (understanding); a quarter of that for generation
ckpt_interval = 250
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
lora_r = 0  # 0: no LoRA; else LoRA rank on the LM projections
lora_alpha = 32
lora_dropout = 0.05
train_modules = "all"  # comma list of fully trained parts: vision,aligner,lm,gen,vq | all | '' (LoRA only)
gradient_checkpointing = False
# objective (SFT; the game adds its own terms)
w_und = 1.0  # understanding cross-entropy
w_gen = 1.0  # text-to-image cross-entropy over VQ codes
w_vq = 0.0  # VQ reconstruction + codebook loss (training the VQ model)
vq_iters = 0  # scratch: the first vq_iters steps train the VQ model alone, then it is frozen
# optimisation
batch_size = 32  # per process
max_iters = 2000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA
compile = torch.cuda.is_available()
threads = 0  # CPU threads for torch (0: torch's default)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (int, float, bool, str))}
# -----------------------------------------------------------------------------------------------

# distributed set-up from torchrun's environment; one process otherwise
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=__import__("datetime").timedelta(minutes=10))
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed + rank)
device_type = "cuda" if device.startswith("cuda") else "cpu"
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == "cuda" else nullcontext()
if master:
    os.makedirs(out_dir, exist_ok=True)

# ---- data -------------------------------------------------------------------------------------
if dataset == "shapes":
    records = data.shapes_world("train", train_n, seed=0)
    eval_records = data.shapes_world("test", eval_n, seed=0)
elif dataset == "vqav2":
    records = data.load_vqav2(vqav2_questions, vqav2_annotations, vqav2_images, skip_bad=skip_bad)
    eval_records = records[:eval_n]  # a held-out VQAv2 split is eval.py's job
elif dataset == "jsonl":
    records = data.load_jsonl(jsonl_path, skip_bad=skip_bad)
    eval_records = records[:eval_n]
else:
    raise SystemExit(f"config error: dataset={dataset!r}: expected 'shapes', 'vqav2' or 'jsonl'")
if len(records) < batch_size * world_size:
    raise SystemExit(f"config error: {len(records)} training samples, fewer than batch_size*world_size={batch_size * world_size}")
loader = data.make_loader(data.Records(records, skip_bad=skip_bad), batch_size, shuffle=True, seed=seed,
                          num_workers=num_workers)

# ---- model ------------------------------------------------------------------------------------
ckpt_dir = os.path.join(out_dir, "ckpt")
resume = init_from == "resume"
if resume:
    with open(os.path.join(ckpt_dir, "ckpt.json")) as f:
        ckpt_meta = json.load(f)
    base = ckpt_meta["config"]["init_from"]
else:
    base = init_from
if base == "scratch":
    texts = [s["question"] for s in records] + [s["caption"] for s in records] + [a for s in records for a in s["answers"]]
    tok = build_tokenizer(texts, tokenizer_vocab)
    umm = UMM.from_config(tiny_config(tok), tok)
else:
    umm = UMM.from_pretrained(base)
umm.to(device)
if gradient_checkpointing:
    umm.janus.gradient_checkpointing_enable()

# what trains: named groups of Janus modules, fully, plus LoRA on the LM projections
jm = umm.janus.model
groups = {"vision": [jm.vision_model], "aligner": [jm.aligner], "lm": [jm.language_model, umm.janus.lm_head],
          "gen": [jm.generation_embeddings, jm.generation_aligner, jm.generation_head], "vq": [jm.vqmodel]}
chosen = list(groups) if train_modules == "all" else [g for g in train_modules.split(",") if g]
for g in chosen:
    if g not in groups:
        raise SystemExit(f"config error: train_modules has unknown part {g!r}; parts: {', '.join(groups)}")
umm.requires_grad_(False)
for g in chosen:
    for m in groups[g]:
        m.requires_grad_(True)
if lora_r:
    add_lora(jm.language_model, lora_r, lora_alpha, lora_dropout)  # LoRA parameters require grad
params = {n: p for n, p in umm.named_parameters() if p.requires_grad}
if not params:
    raise SystemExit("config error: nothing trains: set train_modules and/or lora_r")
if compile:
    jm.language_model.compile()
    jm.vision_model.compile()
if master:
    n_all = sum(p.numel() for p in umm.parameters())
    print(f"model: {base} | {n_all / 1e6:.2f}M parameters, {sum(p.numel() for p in params.values()) / 1e6:.2f}M trained "
          f"({', '.join(chosen) or 'none'}{' + LoRA r=%d' % lora_r if lora_r else ''}) | {world_size} process(es) on {device}")

decay = [p for n, p in params.items() if p.dim() >= 2]
no_decay = [p for n, p in params.items() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(beta1, beta2))


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


def save_checkpoint(it):
    """out_dir/ckpt: state.safetensors (trained tensors), optim.safetensors (AdamW moments),
    ckpt.json (step, config, where each piece is), model/ (the merged model in HF format)."""
    tmp = ckpt_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, os.path.join(tmp, "state.safetensors"))
    opt = optimizer.state_dict()
    names = list(params)
    tensors = {f"{names[i]}.{k}": v.contiguous().cpu() for i, st in opt["state"].items() for k, v in st.items()}
    save_file(tensors, os.path.join(tmp, "optim.safetensors"))
    umm.save_pretrained(os.path.join(tmp, "model"))
    meta = {"iter_num": it, "config": config, "base": base, "state": "state.safetensors", "optimizer": "optim.safetensors",
            "model": "model", "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]}
    with open(os.path.join(tmp, "ckpt.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.isdir(ckpt_dir):
        os.replace(ckpt_dir, ckpt_dir + ".old")
    os.replace(tmp, ckpt_dir)
    if os.path.isdir(ckpt_dir + ".old"):
        __import__("shutil").rmtree(ckpt_dir + ".old")


def load_checkpoint():
    state = load_file(os.path.join(ckpt_dir, ckpt_meta["state"]))
    missing = set(params) - set(state)
    if missing:
        raise SystemExit(f"{ckpt_dir}/{ckpt_meta['state']}: lacks trained tensors {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    moments = load_file(os.path.join(ckpt_dir, ckpt_meta["optimizer"]))
    opt = optimizer.state_dict()
    for i, n in enumerate(params):
        st = {k.rsplit(".", 1)[1]: v.to(device) for k, v in moments.items() if k.rsplit(".", 1)[0] == n}
        if st:
            opt["state"][i] = st
    optimizer.load_state_dict(opt)
    return ckpt_meta["iter_num"]


iter_num = load_checkpoint() if resume else 0
log_path = os.path.join(out_dir, "log.jsonl")
batches = data.infinite_batches(loader, epoch=iter_num * batch_size * world_size // max(1, len(records)))

# ---- the loop ---------------------------------------------------------------------------------
bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
skipped, t0 = [], time.time()
while iter_num < max_iters:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(iter_num)
    batch = next(batches)
    skipped += batch["skipped"]
    pixels = umm.preprocess(batch["images"])
    questions, captions = batch["questions"], batch["captions"]
    answers = [max(set(a), key=a.count) for a in batch["answers"]]  # the annotators' most common answer
    umm.train()
    logs = {}
    with ctx:
        if iter_num < vq_iters or w_vq > 0:
            rec, cb, _ = umm.vq_losses(pixels)
            loss = rec + cb
            logs.update(rec=rec.item(), codebook=cb.item())
        else:
            loss = 0.0
        if iter_num >= vq_iters:
            if w_und:
                ce_und = umm.answer_loss(umm.image_embeds(pixels), questions, answers).mean()
                loss = loss + w_und * ce_und
                logs["und"] = ce_und.item()
            if w_gen and all(captions):
                with torch.no_grad():
                    codes = umm.image_codes(pixels)
                ce_gen = umm.image_loss(captions, codes).mean()
                loss = loss + w_gen * ce_gen
                logs["gen"] = ce_gen.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sync_grads(params.values())
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    optimizer.step()
    iter_num += 1
    bar.update(1)

    if master and (iter_num % log_interval == 0 or iter_num == max_iters):
        logs = {"iter": iter_num, "lr": lr_at(iter_num - 1), "loss": float(loss), "grad_norm": float(grad_norm), **logs,
                "time": round(time.time() - t0, 1)}
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k not in ("iter", "time", "lr")})
        with open(log_path, "a") as f:
            f.write(json.dumps(logs) + "\n")
    if master and ((eval_interval and iter_num % eval_interval == 0) or iter_num == max_iters):
        umm.eval()
        res = evaluate(umm, eval_records, gen_n=eval_n // 4 if dataset == "shapes" else 0, progress=False)
        bar.write(f"iter {iter_num}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        with open(log_path, "a") as f:
            f.write(json.dumps({"iter": iter_num, "eval": res}) + "\n")
    if master and (iter_num % ckpt_interval == 0 or iter_num == max_iters):
        save_checkpoint(iter_num)
bar.close()

if master:
    if skipped:
        print(f"skipped {len(skipped)} unreadable samples; first: {skipped[:3]}")
    if export_dir:
        umm.save_pretrained(export_dir, dtype=getattr(torch, export_dtype))
        print(f"exported the model to {export_dir}")
    print(f"done: {iter_num} iterations in {time.time() - t0:.0f}s; checkpoint in {ckpt_dir}")
if ddp:
    dist.destroy_process_group()
