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
from eval import evaluate, perturbed_embed, understanding_accuracy
import torch.nn.functional as F
from buffer import HardBuffer, hardness, select_hard
from model import UMM, add_lora, build_tokenizer, clip_scorer, tiny_config
from perturber import Perturber, regularizer

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
lora_r = 16  # 0: no LoRA; else LoRA rank on the LM projections (q, k, v, o, gate, up, down)
lora_alpha = 32
lora_dropout = 0.05
train_modules = ""  # comma list of fully trained parts: vision,aligner,lm,gen,vq | all | '' (LoRA only)
gradient_checkpointing = False
# objective: loss_D = w_clean*CE(clean) + CE(hard samples) [+ w_gen*CE(image codes) + w_vq*VQ losses]
w_clean = 1.0  # understanding cross-entropy on the clean batch
w_gen = 0.0  # text-to-image cross-entropy over VQ codes (keeps generation trained; the base uses 1.0)
gen_uncond_p = 0.1  # share of text-to-image samples trained with the unconditional prompt (for guidance)
w_vq = 0.0  # VQ reconstruction + codebook loss (training the VQ model)
vq_iters = 0  # scratch: the first vq_iters steps train the VQ model alone, then it is frozen
# the game (game=False: the SFT baseline, same data, steps and optimizer)
game = True
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
torch.manual_seed(seed)  # every rank builds identical LoRA and perturber weights; reseeded per rank below
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
if w_gen and not all(r["caption"] for r in records):
    raise SystemExit(f"config error: w_gen={w_gen} needs a caption on every training sample; "
                     f"{sum(not r['caption'] for r in records)} have none (set w_gen=0)")
loader = data.make_loader(data.Records(records, skip_bad=skip_bad), batch_size, shuffle=True, seed=seed,
                          num_workers=num_workers)

# ---- model ------------------------------------------------------------------------------------
ckpt_dir = os.path.join(out_dir, "ckpt")
resume = init_from == "resume"
if resume:
    try:
        with open(os.path.join(ckpt_dir, "ckpt.json")) as f:
            ckpt_meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot resume: {os.path.join(ckpt_dir, 'ckpt.json')}: {e}") from None
    base = ckpt_meta["base"]
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
decay = [p for n, p in params.items() if p.dim() >= 2]
no_decay = [p for n, p in params.items() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(beta1, beta2))

# the adversary: a perturber at the visual-token interface, its optimizer, and the hard buffer
if perturb_at not in ("vq", "aligner") or mine not in ("decode", "generate") or buffer_rule not in ("consistent", "published"):
    raise SystemExit(f"config error: perturb_at={perturb_at!r} (vq|aligner), mine={mine!r} (decode|generate), "
                     f"buffer_rule={buffer_rule!r} (consistent|published)")
token_dim = umm.codebook.shape[1] if perturb_at == "vq" else umm.janus.config.text_config.hidden_size
perturber = Perturber(token_dim, eps_min=eps_min, eps_max=eps_max, eps_init=eps_init, relative=eps_relative).to(device)
opt_G = torch.optim.AdamW(perturber.parameters(), lr=lr_G, weight_decay=0.0)
buffer = HardBuffer(buffer_capacity, buffer_temperature)  # per rank: each process mines and trains on its own
grid = (umm.grid, umm.grid)
if clip_path and perturb_at != "vq":
    raise SystemExit("config error: clip_path scores images, but perturb_at='aligner' candidates are not images; use perturb_at='vq'")
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
    """Debug: every rank must hold the same trained parameters (LoRA / modules and the perturber)."""
    flat = torch.cat([p.detach().float().flatten() for p in [*params.values(), *perturber.parameters()]])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device) % 997).sum()])
    everyone = [torch.zeros_like(fingerprint) for _ in range(world_size)]
    dist.all_gather(everyone, fingerprint)
    if any(not torch.equal(f, everyone[0]) for f in everyone):
        raise RuntimeError(f"iter {it}: ranks hold different parameters: {[f.tolist() for f in everyone]}")
    if master:
        tqdm.write(f"iter {it}: parameters identical on all {world_size} ranks")


def hard_embeds(items):
    """Understanding embeds of buffered hard samples: decoded from their codes ('vq'), or their
    image's embeds plus the stored perturbation ('aligner')."""
    if "codes" in items[0]:
        with torch.no_grad():
            px = umm.decode_codes(torch.stack([it["codes"] for it in items]).to(device)).clamp(-1, 1)
        return umm.image_embeds(px)
    deltas = torch.stack([it["delta"] for it in items]).to(device)
    return umm.image_embeds(umm.preprocess([it["image"] for it in items])) + deltas.to(umm.dtype)


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


def save_checkpoint(it):
    """out_dir/ckpt: state.safetensors (trained tensors and the perturber), optim.safetensors (AdamW
    moments), buffer.safetensors + buffer.json (the hard buffer), ckpt.json (step, config, where each
    piece is), model/ (the merged model in HF format). Written beside and swapped in by rename."""
    tmp = ckpt_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in params.items()}
    state.update({f"perturber.{n}": p.detach().contiguous().cpu() for n, p in perturber.named_parameters()})
    save_file(state, os.path.join(tmp, "state.safetensors"))
    moments = optimizer_tensors(optimizer, list(params), "")
    moments.update(optimizer_tensors(opt_G, [n for n, _ in perturber.named_parameters()], "perturber."))
    save_file(moments, os.path.join(tmp, "optim.safetensors"))
    bs = buffer.state_dict()
    save_file({"H": bs["H"].contiguous(), **{f"{i}.{k}": v.contiguous() for i, item in enumerate(bs["items"])
                                              for k, v in item.items() if torch.is_tensor(v)}},
              os.path.join(tmp, "buffer.safetensors"))
    with open(os.path.join(tmp, "buffer.json"), "w") as f:
        json.dump([{k: v for k, v in item.items() if not torch.is_tensor(v)} for item in bs["items"]], f)
    umm.save_pretrained(os.path.join(tmp, "model"))
    meta = {"iter_num": it, "config": config, "base": base, "state": "state.safetensors", "optimizer": "optim.safetensors",
            "buffer": ["buffer.safetensors", "buffer.json"], "model": "model"}
    with open(os.path.join(tmp, "ckpt.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.isdir(ckpt_dir):
        os.replace(ckpt_dir, ckpt_dir + ".old")
    os.replace(tmp, ckpt_dir)
    if os.path.isdir(ckpt_dir + ".old"):
        __import__("shutil").rmtree(ckpt_dir + ".old")


def load_checkpoint():
    state = load_file(os.path.join(ckpt_dir, ckpt_meta["state"]))
    named = {**params, **{f"perturber.{n}": p for n, p in perturber.named_parameters()}}
    missing = set(named) - set(state)
    if missing:
        raise SystemExit(f"{ckpt_dir}/{ckpt_meta['state']}: lacks trained tensors {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state[n])
    moments = load_file(os.path.join(ckpt_dir, ckpt_meta["optimizer"]))
    load_optimizer(optimizer, list(params), "", moments)
    load_optimizer(opt_G, [n for n, _ in perturber.named_parameters()], "perturber.", moments)
    tensors = load_file(os.path.join(ckpt_dir, ckpt_meta["buffer"][0]))
    with open(os.path.join(ckpt_dir, ckpt_meta["buffer"][1])) as f:
        items = json.load(f)
    for k, v in tensors.items():  # "{item index}.{key}" -> that item's tensor
        if k != "H":
            i, key = k.split(".", 1)
            items[int(i)][key] = v
    buffer.load_state_dict({"capacity": buffer_capacity, "temperature": buffer_temperature, "H": tensors["H"], "items": items})
    return ckpt_meta["iter_num"]


def summary():
    """Clean accuracy and accuracy under the current perturber on the evaluation samples."""
    umm.eval()
    res = {"clean": understanding_accuracy(umm, eval_records, progress=False)}
    if game:
        res["under_perturber"] = understanding_accuracy(umm, eval_records, perturbed_embed(umm, perturber, perturb_at), progress=False)
    return res


torch.manual_seed(seed + rank)  # from here on, dropout and the mining jitter differ between ranks
iter_num = load_checkpoint() if resume else 0
log_path = os.path.join(out_dir, "log.jsonl")
batches = data.infinite_batches(loader, epoch=iter_num * batch_size * world_size // max(1, len(records)))
before = summary() if master and not resume else None

# ---- the loop ---------------------------------------------------------------------------------
bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
skipped, t0 = [], time.time()
while iter_num < max_iters:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(iter_num)
    batch = next(batches)
    skipped += batch["skipped"]
    if not batch["images"]:  # every sample of this batch was unreadable (skip_bad): counted above, draw another
        continue
    pixels = umm.preprocess(batch["images"])
    questions, captions, B = batch["questions"], batch["captions"], len(batch["questions"])
    answers = [max(a, key=a.count) for a in batch["answers"]]  # the annotators' most common answer (first on ties)
    umm.train()
    logs = {}

    if game:
        with ctx:
            # 1. encode the images to the tokens the game is played on
            with torch.no_grad():
                tokens = umm.visual_tokens(pixels, perturb_at)
            # 2. perturb them, inside the budget
            delta = perturber(tokens)
            # 3. project onto the decoder's manifold (nearest codebook entries, straight-through) and decode
            emb_adv, px_adv = umm.perturbed_view(tokens + delta, perturb_at)
            # 4. the perturber's move: maximise the understanding loss on what it made, minus R(delta)
            ce_adv = umm.answer_loss(emb_adv, questions, answers)
            loss_G = -lam * ce_adv.mean() + regularizer(delta, perturber.eps, w_l2, w_tv, w_eps, grid)
        # gradients for the perturber only: the LM takes no weight gradients in this pass
        for p, g in zip(perturber.parameters(), torch.autograd.grad(loss_G, list(perturber.parameters()))):
            p.grad = g
        sync_grads(perturber.parameters())
        torch.nn.utils.clip_grad_norm_(perturber.parameters(), grad_clip)
        opt_G.step()
        opt_G.zero_grad(set_to_none=True)
        logs.update(loss_G=loss_G.item(), adv=ce_adv.mean().item(), eps=perturber.eps.item())

        # 5. mine: candidates, their consistency with the text, the hardest kept in the buffer
        if iter_num % mine_stride == 0:
            with torch.no_grad(), ctx:
                ref = umm.image_embeds(pixels).mean(1)  # s is measured against the real image of the same text
                cands = []  # (understanding embeds, pixels, CE, what the buffer stores of each candidate)
                if mine == "decode":  # this batch's adversarial images, plus jittered draws of the perturber
                    clean_u8 = umm.to_uint8(pixels) if perturb_at == "aligner" else None
                    for k in range(cand_k):
                        t = tokens + (delta.detach() if k == 0 else perturber(tokens, noise_std=cand_noise))
                        e, px = (emb_adv.detach(), px_adv) if k == 0 else umm.perturbed_view(t, perturb_at)
                        ce = ce_adv.detach() if k == 0 else umm.answer_loss(e, questions, answers)
                        store = ({"codes": umm.project_to_codebook(t)[1]} if perturb_at == "vq" else
                                 {"image": clean_u8, "delta": (t - tokens).half()})
                        cands.append((e, px, ce, store))
                else:  # 'generate': the generation branch draws images of the text, the perturber steering each token
                    prompts = [c or q for c, q in zip(captions, questions)]
                    for k in range(cand_k):
                        hook = (lambda v: v + perturber(v)) if perturb_at == "vq" else None
                        codes = umm.generate_images(prompts, gen_cfg, gen_temperature, token_hook=hook)
                        px = umm.decode_codes(codes).clamp(-1, 1)
                        e = umm.image_embeds(px)
                        if perturb_at == "vq":
                            store = {"codes": codes}
                        else:
                            d = perturber(e, noise_std=cand_noise)
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
        if iter_num >= vq_iters:
            emb = umm.image_embeds(pixels)
            if hard:
                emb = torch.cat([emb, hard_embeds(hard)])
            ce = umm.answer_loss(emb, questions + [h["question"] for h in hard], answers + [h["answer"] for h in hard])
            loss = loss + w_clean * ce[:B].mean() + (ce[B:].mean() if hard else 0.0)
            logs["und"] = ce[:B].mean().item()
            if hard:
                logs["hard"] = ce[B:].mean().item()
            if w_gen:
                with torch.no_grad():
                    codes = umm.image_codes(pixels)
                ce_gen = umm.image_loss(captions, codes, torch.rand(B) < gen_uncond_p).mean()
                loss = loss + w_gen * ce_gen
                logs["gen"] = ce_gen.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sync_grads(params.values())
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    optimizer.step()
    iter_num += 1
    bar.update(1)
    if ddp and ddp_check_interval and iter_num % ddp_check_interval == 0:
        check_ranks_agree(iter_num)

    if master and (iter_num % log_interval == 0 or iter_num == max_iters):
        logs = {"iter": iter_num, "lr": lr_at(iter_num - 1), "loss": loss.item(), "grad_norm": grad_norm.item(), **logs,
                "time": round(time.time() - t0, 1)}
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("und", "loss_G", "eps", "buffer", "gen", "rec")})
        with open(log_path, "a") as f:
            f.write(json.dumps(logs) + "\n")
    if master and ((eval_interval and iter_num % eval_interval == 0) or iter_num == max_iters):
        umm.eval()
        res = evaluate(umm, eval_records, gen_n=eval_n // 4 if dataset == "shapes" and w_gen else 0, progress=False)
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
    after = summary()
    print(f"done: {iter_num} iterations in {time.time() - t0:.0f}s; checkpoint in {ckpt_dir}")
    print(f"{'accuracy on ' + str(len(eval_records)) + ' eval samples':<34}{'before':>8}{'after':>8}")
    for k in after:
        print(f"{k:<34}{before[k] if before else float('nan'):>8.3f}{after[k]:>8.3f}")
    with open(log_path, "a") as f:
        f.write(json.dumps({"iter": iter_num, "summary": {"before": before, "after": after}}) + "\n")
if ddp:
    dist.destroy_process_group()
