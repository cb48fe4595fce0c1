"""
Build the tiny base Janus of the built-in world from scratch, and export it beside this file, to
assets/shapes-base (float16 weights, about 10 MB). This is how the shipped base was made:

    python assets/build_base.py                               # the shipped recipe (run from the repo root)
    python assets/build_base.py --max_iters=30 --export_dir=out/x
    python assets/build_base.py --resume=True                 # go on from out_dir/ckpt, exactly

A BPE tokenizer is trained on the world's text, then a freshly initialised Janus trains in full (no LoRA,
no game) by SFT. Steps 0-599: the VQ model learns to reconstruct, and SigLIP learns to name each object's
colour and shape (vision_labels_iters). Steps 600-3299: understanding (a tenth of it captioning) +
text-to-image on half of each batch, while SigLIP keeps its labels. README: The shipped base model.

Every module-level name below is a configuration key; --key=value flags and config files override them
(configurator.py). Unknown keys are errors.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data, model, eval

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
from eval import evaluate
from model import UMM, build_tokenizer, tiny_config

# -----------------------------------------------------------------------------------------------
# configuration: the shipped recipe
# I/O
out_dir = "out/base-shapes"  # log.jsonl and ckpt/
export_dir = "assets/shapes-base"  # '': no export
export_dtype = "float16"  # float32 | float16 | bfloat16
log_interval = 10
eval_interval = 1100  # 0: evaluate only at the end
eval_n = 256  # test samples per evaluation (understanding); a quarter of that for generation and reconstruction
ckpt_interval = 500  # out_dir/ckpt (checkpoint.py): weights, optimizer, RNG and place in the data, for resume
resume = False  # go on from out_dir/ckpt (written with the same configuration)
seed = 1337
train_n = 20000  # samples of the built-in world's train split
# model
tokenizer_vocab = 512  # BPE vocabulary trained on the world's text
lm_layers = 4  # LM depth
vision_layers = 4  # SigLIP depth: with 2 layers its tokens hardly tell the shapes apart
aligner_init_scale = 0.1  # the aligner's last layer starts this much smaller: image tokens enter the LM near the
#   scale of the text embeddings
vision_pos_init_scale = 10.0  # SigLIP's position embeddings start this much larger, near the scale of its patch embeddings
# objective: VQ losses (first vq_iters steps) + SigLIP's labels (first vision_labels_iters steps), then
#   understanding CE + w_gen * text-to-image CE
vq_iters = 600  # the VQ model learns alone first, so that generation's targets (its codes) hold still
w_vq = 0.0  # after vq_iters, the VQ losses at this weight (0: the VQ model takes no more gradients)
vision_labels_iters = 3300  # SigLIP also learns to name each object's colour and shape (a linear head on its features
#   pooled over the object's half of the image, dropped afterwards): the tiny base's stand-in for the pretrained
#   SigLIP that Janus-Pro starts from. 3300: throughout
caption_p = 0.1  # share of understanding samples asked to describe the image instead (answer: its caption): a caption
#   names every object's colour, shape and place, a one-word answer only one
w_gen = 1.0  # text-to-image cross-entropy over VQ codes: generation is learned here too
gen_bs = 16  # ... on the first gen_bs samples of each batch (0: all): it learns fast enough, and understanding gets the steps
gen_uncond_p = 0.1  # share of text-to-image samples trained with the unconditional prompt (for guidance)
# optimisation: AdamW, linear warm-up, cosine decay to min_lr
batch_size = 32
max_iters = 3300
lr = 1e-3
min_lr = 5e-5
warmup_iters = 100
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
max_bad_steps = 20  # a non-finite loss or gradient skips that update; this many in a row stop the run
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype, on either device ('float32': none)
compile = torch.cuda.is_available()
threads = 0  # CPU threads for torch (0: torch's default)
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configurator.py")).read())
config = {k: globals()[k] for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (int, float, bool, str))}
# -----------------------------------------------------------------------------------------------

# start-up checks: impossible settings stop here, all of them named, before anything is built
at_least = dict(max_iters=1, batch_size=1, eval_n=1, log_interval=1, ckpt_interval=1, eval_interval=0, vq_iters=0,
                vision_labels_iters=0, gen_bs=0, lm_layers=1, vision_layers=1, warmup_iters=0, max_bad_steps=1, threads=0)
problems = [f"{k}={globals()[k]}: must be >= {least}" for k, least in at_least.items() if globals()[k] < least]
problems += [msg for bad, msg in [
    (vq_iters > max_iters, f"vq_iters={vq_iters}: more than max_iters={max_iters}"),
    (train_n < batch_size, f"train_n={train_n}: fewer samples than one batch, batch_size={batch_size}"),
    (not 0 <= caption_p <= 1, f"caption_p={caption_p}: a probability, must lie in [0, 1]"),
    (not 0 <= gen_uncond_p <= 1, f"gen_uncond_p={gen_uncond_p}: a probability, must lie in [0, 1]"),
    (grad_clip <= 0, f"grad_clip={grad_clip}: must be > 0"),
    (export_dtype not in ("float32", "float16", "bfloat16"), f"export_dtype={export_dtype!r}: expected 'float32', 'float16' or 'bfloat16'"),
    (dtype not in ("float32", "float16", "bfloat16"), f"dtype={dtype!r}: expected 'float32', 'float16' or 'bfloat16'"),
    (device.startswith("cuda") and not torch.cuda.is_available(), f"device={device!r}, but CUDA is not available here"),
    (resume and not os.path.isdir(os.path.join(out_dir, "ckpt")), f"resume=True, but {out_dir}/ckpt does not exist"),
] if bad]
if problems:
    raise SystemExit("\n".join(f"config error: {p}" for p in problems))
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
device_type = "cuda" if device.startswith("cuda") else "cpu"
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
os.makedirs(out_dir, exist_ok=True)
ckpt_dir, log_path = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "log.jsonl")

# ---- data: the built-in world -----------------------------------------------------------------
records = data.shapes_world("train", train_n, seed=0)
eval_records = data.shapes_world("test", eval_n, seed=0)
loader = data.make_loader(data.Records(records), batch_size, shuffle=True, seed=seed)

# ---- model: a tokenizer of the world's text, a fresh Janus, and SigLIP's temporary label head ----
texts = [s["question"] for s in records] + [s["caption"] for s in records] + [a for s in records for a in s["answers"]] + [data.DESCRIBE]
tok = build_tokenizer(texts, tokenizer_vocab)
umm = UMM.from_config(tiny_config(tok, lm_layers=lm_layers, vision_layers=vision_layers), tok,
                      aligner_init_scale=aligner_init_scale, pos_init_scale=vision_pos_init_scale).to(device)
vision_head = torch.nn.Linear(umm.janus.config.vision_config.hidden_size, len(data.COLORS) + len(data.SHAPES)).to(device)
params = {**dict(umm.named_parameters()), **{f"vision_head.{n}": p for n, p in vision_head.named_parameters()}}
decay = [p for p in params.values() if p.dim() >= 2]
no_decay = [p for p in params.values() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(beta1, beta2))
if compile:
    umm.compile_towers()
print(f"model: {sum(p.numel() for p in umm.parameters()) / 1e6:.2f}M parameters (LM {lm_layers} layers, SigLIP "
      f"{vision_layers}), tokenizer of {len(tok)} tokens, on {device}")


def vision_label_loss(h, attrs, logs):
    """Cross-entropy of each object's colour and shape, read by vision_head from SigLIP's features h (B, N, D)
    averaged over the patches of the object's box (data.object_labels)."""
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


def lr_at(it):
    """Linear warm-up, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def save_checkpoint():
    """out_dir/ckpt (checkpoint.py, atomic): weights and label head, AdamW's moments, RNG and place in the data."""
    checkpoint.save(ckpt_dir, {"iter_num": iter_num, "bad_in_row": bad_in_row, "config": config, "vocab": tok.get_vocab()},
                    shared={"state": params, "optim": checkpoint.optimizer_state(optimizer, list(params))},
                    own={"rank": {"rng": checkpoint.rng_state(device), "data_position": list(data_position)}})


torch.manual_seed(seed)  # the loop's draws (which samples caption, which generate unconditionally) start here
iter_num, data_position, bad_in_row = 0, (0, 0), 0
if resume:
    meta, shared, own = checkpoint.load(ckpt_dir)
    if meta["vocab"] != tok.get_vocab():
        raise SystemExit(f"cannot resume: {ckpt_dir} holds another tokenizer (written with other train_n / tokenizer_vocab?)")
    checkpoint.load_tensors(params, shared["state"], f"{ckpt_dir}/state.safetensors")
    checkpoint.load_optimizer_state(optimizer, list(params), shared["optim"])
    checkpoint.set_rng_state(own["rank"]["rng"], device)
    iter_num, data_position, bad_in_row = meta["iter_num"], tuple(own["rank"]["data_position"]), meta["bad_in_row"]
    checkpoint.trim_log(log_path, iter_num)  # the log as of the checkpoint, so that it reads as one run
    print(checkpoint.resumed(ckpt_dir, meta, max_iters))  # from where, and where the lr schedule now ends
batches = data.infinite_batches(loader, *data_position)  # (epoch, batch): the shuffled order goes on where it stood

# ---- the loop ---------------------------------------------------------------------------------
bar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True)
t0, start_iter = time.time(), iter_num
while iter_num < max_iters:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(iter_num)
    batch = next(batches)
    data_position = batch["position"]
    pixels = umm.preprocess(batch["images"])
    questions, captions, B = batch["questions"], batch["captions"], len(batch["questions"])
    answers = [max(a, key=a.count) for a in batch["answers"]]
    if caption_p:
        describe = [torch.rand(()).item() < caption_p for _ in captions]
        questions = [data.DESCRIBE if d else q for d, q in zip(describe, questions)]
        answers = [c if d else a for d, c, a in zip(describe, captions, answers)]
    umm.train()
    logs = {}
    with ctx:
        loss = 0.0
        if iter_num < vq_iters or w_vq > 0:  # VQ reconstruction + codebook losses
            rec, cb = umm.vq_losses(pixels)[:2]
            loss = (1.0 if iter_num < vq_iters else w_vq) * (rec + cb)
            logs.update(rec=rec.item(), codebook=cb.item())
        feats = umm.vision_features(pixels) if iter_num < vision_labels_iters or iter_num >= vq_iters else None
        if iter_num < vision_labels_iters:  # SigLIP's labels, from the features the understanding step uses too
            loss = loss + vision_label_loss(feats, batch["attrs"], logs)
        if iter_num >= vq_iters:  # the VQ model learns alone first, so that generation's targets (its codes) hold still
            ce = umm.answer_loss(umm.align(feats), questions, answers).mean()
            loss = loss + ce
            logs["und"] = ce.item()
            if w_gen:
                n = min(gen_bs or B, B)
                ce_gen = umm.text_to_image_loss(captions[:n], pixels[:n], gen_uncond_p).mean()
                loss = loss + w_gen * ce_gen
                logs["gen"] = ce_gen.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        optimizer.step()
        bad_in_row = 0
    else:  # a non-finite loss or gradient: the update is skipped, and logged; max_bad_steps in a row stop the run
        bad_in_row += 1
        logs["skipped_update"] = f"loss={loss.item():.3g}, grad_norm={grad_norm.item():.3g}"
        if bad_in_row >= max_bad_steps:
            bar.close()
            raise SystemExit(f"stopping at iter {iter_num + 1}: {bad_in_row} steps in a row with non-finite values; "
                             f"the last checkpoint, {ckpt_dir}, is intact")
    iter_num += 1
    bar.update(1)

    if iter_num % log_interval == 0 or iter_num == max_iters or "skipped_update" in logs:
        logs = {"iter": iter_num, "lr": lr_at(iter_num - 1), "loss": loss.item(), "grad_norm": grad_norm.item(), **logs,
                "time": round(time.time() - t0, 1)}
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("rec", "vis_shape", "und", "gen")})
        with open(log_path, "a") as f:
            f.write(json.dumps(logs) + "\n")
    if (eval_interval and iter_num % eval_interval == 0) or iter_num == max_iters:
        umm.eval()
        res = evaluate(umm, eval_records, gen_n=eval_n // 4 if w_gen else 0)
        bar.write(f"iter {iter_num}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        with open(log_path, "a") as f:
            f.write(json.dumps({"iter": iter_num, "eval": res}) + "\n")
    if iter_num % ckpt_interval == 0 or iter_num == max_iters:
        save_checkpoint()
bar.close()

if export_dir:  # the Janus alone: SigLIP's label head stays behind
    umm.save_pretrained(export_dir, dtype=getattr(torch, export_dtype))
    print(f"exported the model to {export_dir}")
print(f"done: {iter_num - start_iter} iterations (iter {start_iter} to {iter_num}) in {time.time() - t0:.0f}s; log in {log_path}")
