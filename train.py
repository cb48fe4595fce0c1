"""
UniGame post-training: one explicit loop, read top to bottom.

    python train.py                                      # UniGame post-training of assets/shapes-base
    python train.py --game=False                         # the SFT baseline: same data, steps, optimizer
    torchrun --nproc_per_node=8 train.py config/unigame_janus_pro_7b.py

Every module-level name below is a configuration key; config/*.py files and --key=value flags
override them (configurator.py). Unknown keys are errors. The shipped base itself is built from
scratch by assets/build_base.py; checkpoints are written and read by checkpoint.py.
"""

import datetime
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import checkpoint
import data
import ranks
from buffer import HardBuffer, hardness, select_hard
from eval import evaluate, summary, table
from model import UMM, check_weights, clip_scorer, compiled_graphs, save_perturber
from perturber import SEES, Perturber, jitter, pgd_attack, pgd_refine, random_like, regularizer, swap_proposals

# -----------------------------------------------------------------------------------------------
# configuration
# I/O
out_dir = "out"
init_from = "assets/shapes-base"  # 'resume' (out_dir/ckpt) | a local Hugging Face directory (a base: assets/build_base.py)
export_dir = ""  # when set, the final model is also written there (merged LoRA, HF format)
export_dtype = "float32"  # dtype of exported weights: float32 | float16 | bfloat16
log_interval = 10
eval_interval = 100  # 0: evaluate only at the end
eval_n = 256  # test samples per evaluation (understanding); a quarter of that for generation
eval_adv_steps = 5  # the before / after table also reads accuracy under a fresh PGD attack of this many steps at eps_max; 0: not
eval_adv_n = 128  # ... on this many of the eval samples (the first; 0: all): the attack costs ~10x a clean pass
ckpt_interval = 100  # 0: no checkpoints (quick experiments, bench.py)
seed = 1337
# data
dataset = "shapes"  # 'shapes' | 'vqav2' | 'jsonl'
train_n = 20000  # samples of the built-in world's train split
vqav2_questions = vqav2_annotations = vqav2_images = ""  # VQAv2's train2014 questions and annotations JSON; COCO's image folder
jsonl_path = ""  # a JSONL manifest: {"image", "question", "answers", "caption"?}
skip_bad = False  # skip (count and report) unreadable samples instead of stopping
eval_vqav2_questions = eval_vqav2_annotations = eval_vqav2_images = ""  # VQAv2's val2014 files, evaluated on; '': a held-out slice of the training data
prompt_suffix = ""  # after every question, on a line of its own: "Answer the question using a single word or phrase." asks for VQA's short answers
answer_tokens = 16  # most tokens of a generated answer when evaluating (VQAv2's answers fit in 16)
num_workers = 0
# model
lora_r, lora_alpha, lora_dropout = 16, 32, 0.05  # lora_r 0: no LoRA; else its rank on the LM projections (q, k, v, o, gate, up, down)
load_dtype = "float32"  # weights as loaded: 'bfloat16' halves memory when only LoRA trains (LoRA stays float32)
train_modules = ""  # comma list of fully trained parts: vision,aligner,lm,gen,vq | all | '' (LoRA only)
gradient_checkpointing = False
# objective: loss_D = w_clean*CE(clean) + CE(hard samples) [+ w_gen*CE(image codes)]
w_clean = 1.0  # understanding cross-entropy on the clean batch
w_gen = 0.0  # text-to-image cross-entropy over VQ codes (keeps generation trained)
gen_uncond_p = 0.1  # share of text-to-image samples trained with the unconditional prompt (for guidance)
gen_bs = 0  # the text-to-image loss uses the first gen_bs samples of each batch (0: all of them)
# the game (game=False: the SFT baseline, same data, steps and optimizer)
game = True
adversary = "learned"  # 'learned': the perturber plays | 'pgd': PGD adversarial training, a pgd_steps attack on each batch |
#   'random': the control arm, unaimed directions at eps_max; all three through the same encode-project-decode path and buffer
refine_steps = 0  # adversary='learned': PGD steps refining the perturber's delta (a learned start; the first reuses the
#   gradient of the perturber's own update, so costs one forward); 0: the published perturber alone (README: the adversary)
perturber_sees = "token"  # 'token': each token alone (the published perturber) | a '+'-joined set of grad (the answer loss's
#   gradient at it, one backward), noise (per sample: mining's candidates are fresh draws), context (the grid, the question)
refine_size = 1.25  # their step, in units of eps (1.25: FGSM from a start in the ball, Wong et al. 2020)
code_swaps = 0  # adversary='learned' at 'vq': proposals of exact code swaps from the perturber's delta, the j-th moving the top
#   1/2^(j-1) of each image's tokens (by the gradient of its update) onto the reachable entry that gains most; a forward each (0: off)
pgd_steps = 3  # adversary='pgd': attack steps of 2.5 * eps_max / pgd_steps from a random start in the ball
perturb_at = "vq"  # 'vq': codebook-space tokens, projected and decoded | 'aligner': tokens after the aligner
mine = "decode"  # 'decode': this batch's decoded adversarial images | 'generate': images the model generates
eps_relative = True  # budget relative to each token's norm (scale-free); False: absolute (published: LM space)
eps_min, eps_max, eps_init = 0.0, 0.3, 0.15  # codebook tokens are unit vectors: a random delta of 0.3 flips most codes, yet keeps shapes readable
lam = 100.0  # λ: weight of the adversarial cross-entropy in the perturber's loss
lr_G = 1e-2  # the perturber's AdamW learning rate (weight decay 0)
w_l2, w_tv, w_eps = 1e-3, 1e-3, 1e-3  # R(delta): L2, total variation over the token grid, eps^2
mine_stride = 1  # mine every this many steps
cand_k = 2  # candidates per sample (decode: perturber draws with jitter; generate: generated images)
cand_noise = 0.3  # direction jitter of the extra decode candidates around the adversary's delta
q_hard = 0.75  # keep candidates with H >= this batch quantile
hard_topk = 2  # at most this many candidates per source sample
tau = 0.9  # consistency threshold on s
lambda_c = 1.0  # H = CE + lambda_c * max(0, tau - s)
clip_path = ""  # a local CLIP directory: s = CLIP image-text cosine; '': built in (cosine to the real image, in the model's own embedding)
buffer_rule = "consistent"  # 'consistent': drop s < tau | 'published': keep them as hard too
buffer_capacity, buffer_temperature = 4096, 1.75  # rank-softmax sampling temperature
hard_bs = 8  # hard samples per understanding step
mine_log = False  # also log every mining candidate (step, source, CE, s, H, kept) to out_dir/mining{rank}.jsonl (eval.py --curves)
gen_cfg, gen_temperature = 1.0, 1.0  # mine='generate': guidance (1: none; the shipped base has no unconditional branch), sampling
# optimisation
batch_size = 16  # per process
max_iters = 300
lr, min_lr, warmup_iters = 5e-4, 5e-5, 20  # the understanding player's AdamW: warm-up, then cosine decay to min_lr
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype, on either device ('float32': none)
compile = torch.cuda.is_available()  # torch.compile the LM, vision tower and VQ encoder / decoder (model.py: compile_towers)
threads = 0  # CPU threads for torch (0: torch's default)
ddp_check_interval = 0  # debug: every this many steps, check that all ranks hold identical trained parameters
ddp_timeout_s = 600  # a collective waiting longer fails: a stuck rank ends the job instead of hanging it (rank 0 evaluates alone meanwhile)
max_bad_steps = 20  # a non-finite loss or gradient skips that update; this many in a row stop the run
count_flops = False  # bench.py: count the FLOPs of the first step (logged as "flops")
debug_nan_at = ""  # test hook: comma list of iterations (numbered as logged, from 1) whose losses are made NaN
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (int, float, bool, str))}
# -----------------------------------------------------------------------------------------------

# start-up checks: impossible settings stop here, all of them named, before any data or weights are read
chosen = list(UMM.PARTS) if train_modules == "all" else [g for g in train_modules.split(",") if g]
try:
    debug_nan = {int(i) for i in debug_nan_at.split(",") if i.strip()}
except ValueError:
    debug_nan = None
n_procs, floats = int(os.environ.get("WORLD_SIZE", 1)), ("float32", "float16", "bfloat16")
evaluate_on = (eval_vqav2_questions, eval_vqav2_annotations, eval_vqav2_images)  # VQAv2 val, or '' (a held-out slice of the training data)
at_least = dict(max_iters=1, batch_size=1, hard_bs=0, lora_r=0, cand_k=1, hard_topk=1, mine_stride=1, buffer_capacity=1, eval_n=1,
                log_interval=1, ckpt_interval=0, max_bad_steps=1, eval_interval=0, eval_adv_n=0, ddp_check_interval=0, num_workers=0, threads=0, answer_tokens=1)
problems = [f"{k}={globals()[k]}: must be >= {least}" for k, least in at_least.items() if globals()[k] < least]
choices = dict(perturb_at=("vq", "aligner"), mine=("decode", "generate"), buffer_rule=("consistent", "published"),
               adversary=("learned", "random", "pgd"), dataset=("shapes", "vqav2", "jsonl"), dtype=floats, load_dtype=floats, export_dtype=floats)
problems += [f"{k}={globals()[k]!r}: expected one of {', '.join(map(repr, v))}" for k, v in choices.items() if globals()[k] not in v]
problems += [msg for bad, msg in [
    (not 0 <= q_hard <= 1, f"q_hard={q_hard}: a quantile, must lie in [0, 1]"),
    (not 0 <= eps_min < eps_init < eps_max, f"eps_min={eps_min}, eps_init={eps_init}, eps_max={eps_max}: need 0 <= eps_min < eps_init < eps_max"),
    (lora_r == 0 and not chosen, "nothing trains: lora_r=0 and train_modules='': set train_modules and/or lora_r"),
    (set(chosen) - set(UMM.PARTS), f"train_modules={train_modules!r}: unknown part(s) {sorted(set(chosen) - set(UMM.PARTS))}; parts: {', '.join(UMM.PARTS)} or 'all'"),
    (not 0 <= lora_dropout < 1, f"lora_dropout={lora_dropout}: must lie in [0, 1)"),
    (buffer_temperature <= 0, f"buffer_temperature={buffer_temperature}: must be > 0"),
    (clip_path and perturb_at != "vq", "clip_path scores images, but perturb_at='aligner' candidates are not images: use perturb_at='vq'"),
    (clip_path and not os.path.isdir(clip_path), f"clip_path={clip_path!r}: no such directory"),
    (not 0 <= gen_uncond_p <= 1, f"gen_uncond_p={gen_uncond_p}: a probability, must lie in [0, 1]"),
    (load_dtype != "float32" and chosen, f"load_dtype={load_dtype!r} with train_modules={train_modules!r}: fully trained parts need float32 weights (AdamW steps vanish in 16 bits); only LoRA may train on 16-bit weights"),
    (device.startswith("cuda") and not torch.cuda.is_available(), f"device={device!r}, but CUDA is not available here"),
    (dataset == "shapes" and train_n < batch_size * n_procs, f"train_n={train_n}: fewer samples than one global batch, batch_size*world_size={batch_size}*{n_procs}"),
    (init_from == "scratch", "init_from='scratch': a model from scratch is built by assets/build_base.py; train.py post-trains one"),
    (init_from not in ("scratch", "resume") and not os.path.isfile(os.path.join(init_from, "config.json")),
     f"init_from={init_from!r}: expected 'resume' or a Hugging Face model directory (it has no config.json)"),
    (ddp_timeout_s <= 0, f"ddp_timeout_s={ddp_timeout_s}: must be > 0"),
    (grad_clip <= 0, f"grad_clip={grad_clip}: must be > 0"),
    (adversary == "pgd" and mine != "decode", "adversary='pgd' attacks the batch's own images: use mine='decode'"),
    (set(perturber_sees.split("+")) - set(SEES), f"perturber_sees={perturber_sees!r}: unknown part(s) {sorted(set(perturber_sees.split('+')) - set(SEES))}; a '+'-joined set of {', '.join(SEES)}"),
    (set(perturber_sees.split("+")) - {"token"} and (adversary != "learned" or mine != "decode"),
     f"perturber_sees={perturber_sees!r} plays on the batch's own samples and candidates: use adversary='learned', mine='decode'"),
    (refine_steps < 0 or pgd_steps < 1, f"refine_steps={refine_steps}, pgd_steps={pgd_steps}: need refine_steps >= 0, pgd_steps >= 1"),
    (code_swaps < 0 or code_swaps and (refine_steps or adversary != "learned" or mine != "decode" or perturb_at != "vq"),
     f"code_swaps={code_swaps}: swaps codes of the learned perturber's own images, so need code_swaps >= 0 and, when on, adversary='learned', "
     f"mine='decode', perturb_at='vq' and refine_steps=0 (got {adversary!r}, {mine!r}, {perturb_at!r}, {refine_steps})"),
    (debug_nan is None, f"debug_nan_at={debug_nan_at!r}: expected a comma list of iterations, e.g. '3,5'"),
] if bad]
problems += data.missing_files(dataset, jsonl_path, (vqav2_questions, vqav2_annotations, vqav2_images), evaluate_on)  # named
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
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
if master:
    os.makedirs(out_dir, exist_ok=True)

# where training starts: a checkpoint to resume (read whole now: a bad file stops the run before any work), or weights
ckpt_dir, log_path = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "log.jsonl")
resume = init_from == "resume"
if resume:
    ckpt_meta, ckpt_shared, ckpt_own = checkpoint.load(ckpt_dir, rank, world_size)
base = ckpt_meta["base"] if resume else init_from
if game:  # what the weights hold, read from the safetensors headers before loading them
    check_weights(base, generation=mine == "generate", vq=perturb_at == "vq")

# ---- data -------------------------------------------------------------------------------------
try:  # real files: a bad record stops the run with its file and line named (or is skipped: skip_bad)
    records = data.training_records(dataset, train_n, vqav2_questions, vqav2_annotations, vqav2_images, jsonl_path, skip_bad)
    # evaluation never reads a training sample: VQAv2 val when given, else a held-out slice (whole images) of the training data
    records, eval_records, eval_set = data.evaluation_records(dataset, records, eval_n, skip_bad, *evaluate_on)
except data.BadData as e:
    raise SystemExit(f"data error: {e}") from None
if master:
    print(f"evaluating on {eval_set}")
if len(records) < batch_size * world_size:
    raise SystemExit(f"config error: {len(records)} training samples, fewer than batch_size*world_size={batch_size * world_size}")
if w_gen and not all(r["caption"] for r in records):
    raise SystemExit(f"config error: w_gen={w_gen} needs a caption on every training sample; "
                     f"{sum(not r['caption'] for r in records)} have none (set w_gen=0)")
loader = data.make_loader(data.Records(records, skip_bad=skip_bad), batch_size, shuffle=True, seed=seed,
                          num_workers=num_workers)

# ---- the model: the understanding player ---------------------------------------------------------
umm = UMM.from_pretrained(base, dtype=getattr(torch, load_dtype)).to(device)
umm.prompt_suffix, umm.answer_tokens = prompt_suffix, answer_tokens
if gradient_checkpointing:
    umm.gradient_checkpointing_enable()
params = umm.set_trainable(chosen, lora_r, lora_alpha, lora_dropout)  # named parts fully, and LoRA on the LM
decay = [p for n, p in params.items() if p.dim() >= 2]
no_decay = [p for n, p in params.items() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(beta1, beta2))

# ---- the adversary: a perturber at the visual-token interface, its optimizer, and the hard buffer -----
perturber = Perturber(umm.token_dim(perturb_at), eps_min=eps_min, eps_max=eps_max, eps_init=eps_init, relative=eps_relative,
                      sees=perturber_sees, question_dim=umm.text_dim, tokens=umm.num_image_tokens).to(device)
opt_G = torch.optim.AdamW(perturber.parameters(), lr=lr_G, weight_decay=0.0)
buffer = HardBuffer(buffer_capacity, buffer_temperature)  # per rank: each process mines and trains on its own
clip_score = clip_scorer(clip_path, device) if clip_path else None
trained = {**params, **{f"perturber.{n}": p for n, p in perturber.named_parameters()}}  # what a checkpoint holds
if compile:
    umm.compile_towers()
n_all, n_G = sum(p.numel() for p in umm.parameters()), sum(p.numel() for p in perturber.parameters())
if master:
    print(f"model: {base} | {n_all / 1e6:.2f}M parameters, {sum(p.numel() for p in params.values()) / 1e6:.2f}M trained "
          f"({', '.join(chosen) or 'none'}{' + LoRA r=%d' % lora_r if lora_r else ''}) | {world_size} process(es) on {device}")
    print(f"game: perturb_at={perturb_at}, mine={mine}, perturber {n_G} parameters ({100 * n_G / n_all:.2f}% of the model), eps in "
          f"[{eps_min}, {eps_max}] {'relative to token norm' if eps_relative else 'absolute'}" if game else "game off: the SFT baseline")

# ---- the loop's state: fresh, or as the checkpoint left it (a resumed run goes on exactly as an unbroken one) --
torch.manual_seed(seed + rank)  # from here on, dropout and the mining jitter differ between ranks
iter_num, data_position, skipped, bad_steps, bad_in_row = 0, (0, 0), [], 0, 0
if resume:
    checkpoint.load_tensors(trained, ckpt_shared["state"], f"{ckpt_dir}/state.safetensors")
    checkpoint.load_optimizer_state(optimizer, list(params), ckpt_shared["optim"])
    checkpoint.load_optimizer_state(opt_G, [n for n, _ in perturber.named_parameters()], ckpt_shared["optim"], "perturber.")
    buffer.load_state_dict(ckpt_own["buffer"])
    checkpoint.set_rng_state(ckpt_own["rank"]["rng"], device)
    iter_num, bad_steps, bad_in_row = ckpt_meta["iter_num"], ckpt_meta["bad_steps"], ckpt_meta["bad_in_row"]
    data_position, skipped = tuple(ckpt_own["rank"]["data_position"]), [tuple(s) for s in ckpt_own["rank"]["skipped"]]
    checkpoint.trim_log(os.path.join(out_dir, f"mining{rank}.jsonl"), iter_num)  # mine_log's lines, too, as of the checkpoint
    if master:
        checkpoint.trim_log(log_path, iter_num)  # the log as of the checkpoint, so that it reads as one run
        print(checkpoint.resumed(ckpt_dir, ckpt_meta, max_iters))  # from where, and where the lr schedule now ends
batches = data.infinite_batches(loader, *data_position)  # (epoch, batch): the shuffled order goes on where it stood


# ---- what the loop calls ----------------------------------------------------------------------

def lr_at(it):
    """Linear warm-up, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def draw_delta(z, questions=None, answers=None, seen=None):
    """A perturbation of tokens z inside the budget: the perturber's (seeing `seen` too); for adversary='pgd' a fresh PGD attack
    on the answers (pgd_steps, radius eps_max); in the control arm (adversary='random') a random direction at eps_max."""
    if adversary == "random":
        return random_like(z, eps_max, eps_relative)
    if adversary == "pgd":
        return pgd_attack(lambda t: umm.perturbed_loss(t, questions, answers, perturb_at), z, eps_max, pgd_steps, relative=eps_relative)
    return perturber(z, **(seen or {}))


def per_sample(where, new, old):
    """new for the samples where `where` (B,) holds, else old; tensors whose first dimension is the batch."""
    return torch.where(where.view(-1, *[1] * (old.dim() - 1)), new, old)


def save(it):
    """out_dir/ckpt (checkpoint.py): the trained tensors and both optimizers' moments; what this rank alone
    holds (its hard buffer, RNG state, place in the data, skipped samples); model/, the merged model in Hugging
    Face format with the perturber beside it. Called on every rank; never written with non-finite values."""
    def write_model(folder):
        umm.save_pretrained(os.path.join(folder, "model"))
        if game:  # the perturber alone beside the merged model: perturber.safetensors + perturber.json
            save_perturber(perturber, os.path.join(folder, "model"), perturb_at=perturb_at)
    moments = {**checkpoint.optimizer_state(optimizer, list(params)),
               **checkpoint.optimizer_state(opt_G, [n for n, _ in perturber.named_parameters()], "perturber.")}
    meta = {"iter_num": it, "config": config, "base": base, "bad_steps": bad_steps, "bad_in_row": bad_in_row, "model": "model"}
    try:
        checkpoint.save(ckpt_dir, meta, shared={"state": trained, "optim": moments}, rank=rank, write_extra=write_model,
                        own={"buffer": buffer.state_dict(), "rank": {"rng": checkpoint.rng_state(device), "data_position": list(data_position), "skipped": skipped}})
    except checkpoint.NotFinite as e:
        stop(f"iter {it}: {e}")


def log(**record):
    """One line of out_dir/log.jsonl (rank 0 writes it)."""
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def stop(message):
    """End the run mid-loop with one line, printed after the progress bar so that it is the last one."""
    bar.close()
    raise SystemExit(message)


def clock():
    """(wall, CPU) seconds, after the device's queued work: the log's phase timings (bench.py reads them)."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


# ---- the loop ---------------------------------------------------------------------------------
attack = dict(eps=eps_max, relative=eps_relative, steps=eval_adv_steps) if eval_adv_steps else None  # the table's fresh PGD
table_args = (perturber if game and adversary == "learned" else None, perturb_at, attack, eval_adv_n)  # the same rows after
before = summary(umm, eval_records, *table_args) if master else None  # or at the resumed checkpoint
start_iter = iter_num  # this process trains the steps from here
bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
t0 = time.time()
while iter_num < max_iters:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(iter_num)
    try:
        batch = next(batches)
    except data.BadData as e:  # skip_bad=False: an image that does not decode stops the run, named (from a worker: its last line)
        stop(f"data error: {str(e).strip().splitlines()[-1].split('BadData: ', 1)[-1]} "
             "(skip_bad=True skips and counts such samples)")
    data_position = batch["position"]
    skipped += batch["skipped"]
    if not batch["images"]:  # every sample of this batch was unreadable (skip_bad): counted above, draw another
        continue
    laps = {"start": clock()}  # each phase's end, (wall, CPU); with count_flops, the first step's FLOPs (eager)
    flop_counter = FlopCounterMode(display=False).__enter__() if count_flops and iter_num == start_iter else None
    pixels = umm.preprocess(batch["images"])
    questions, captions, B = batch["questions"], batch["captions"], len(batch["questions"])
    answers = [max(a, key=a.count) for a in batch["answers"]]  # the annotators' most common answer (first on ties)
    umm.train(dropout=False)  # steps 1-5 play against the model as it stands (LoRA's dropout off); step 6 trains it with dropout
    logs, bad_G = {}, []
    poisoned = iter_num + 1 in debug_nan  # the debug_nan_at test hook: this step's losses are made NaN

    if game:
        with ctx, torch.set_grad_enabled(adversary == "learned"):
            # 1. encode the images to the tokens the game is played on
            with torch.no_grad():
                tokens = umm.visual_tokens(pixels, perturb_at)
            # 2. perturb them, inside the budget (the perturber sees what its sees names: UMM.perturber_inputs)
            seen = umm.perturber_inputs(perturber, tokens, questions, answers, perturb_at) if adversary == "learned" else {}
            delta = draw_delta(tokens, questions, answers, seen)
            # 3. project onto the decoder's manifold (nearest codebook entries, straight-through) and decode
            emb_adv, px_adv, codes_adv = umm.perturbed_view(tokens + delta, perturb_at)
            # 4. the perturber's move: maximise the understanding loss on what it made, minus R(delta)
            ce_adv = umm.answer_loss(emb_adv, questions, answers)
            loss_G = -lam * ce_adv.mean() + regularizer(delta, perturber.eps, w_l2, w_tv, w_eps, (umm.grid, umm.grid))
            loss_G = loss_G * float("nan") if poisoned else loss_G
        logs.update(loss_G=loss_G.item(), adv_start=ce_adv.mean().item(), eps=perturber.eps.item() if adversary == "learned" else eps_max)
        if adversary == "learned":  # PGD's and the control arm's deltas have nothing to learn
            # gradients for the perturber only (the LM takes no weight gradients in this pass), and for delta, to aim it
            *grads, grad_delta = torch.autograd.grad(loss_G, [*perturber.parameters(), delta])
            for p, g in zip(perturber.parameters(), grads):
                p.grad = g
            ranks.average_grads(perturber.parameters())
            grad_norm_G = torch.nn.utils.clip_grad_norm_(perturber.parameters(), grad_clip)
            bad_G = ranks.nonfinite(device, loss_G=loss_G.detach(), grad_norm_G=grad_norm_G)
            if not bad_G:  # a NaN / inf loss or gradient: this update is skipped (counted below)
                opt_G.step()
            opt_G.zero_grad(set_to_none=True)
            if refine_steps and mine == "decode" and not bad_G:  # 4b. aim: PGD from the learned start, its first step
                with ctx:  # on the gradient just taken (loss_G falls as the answer loss rises), within the perturber's eps
                    eps = perturber.eps.item()
                    delta = pgd_refine(lambda t: umm.perturbed_loss(t, questions, answers, perturb_at), tokens, delta, eps, refine_steps,
                                       refine_size * eps, eps_relative, grad=-grad_delta)
                    with torch.no_grad():
                        emb_adv, px_adv, codes_adv = umm.perturbed_view(tokens + delta, perturb_at)
                        ce_adv = umm.answer_loss(emb_adv, questions, answers)
            if code_swaps and not bad_G:  # 4c. aim: code swaps the same gradient proposes, each scored by an exact forward
                with ctx, torch.no_grad():
                    swapped = torch.zeros(B, dtype=torch.bool, device=device)
                    for d in swap_proposals(tokens, delta, -grad_delta, umm.codebook, perturber.eps.item(), code_swaps, eps_relative):
                        e, px, codes = umm.perturbed_view(tokens + d, perturb_at)
                        ce = umm.answer_loss(e, questions, answers)
                        harder = ce > ce_adv  # per sample: the proposal is kept where it hurts more
                        delta, emb_adv, px_adv, codes_adv, ce_adv = (per_sample(harder, n, o) for n, o in
                                                                     zip((d, e, px, codes, ce), (delta, emb_adv, px_adv, codes_adv, ce_adv)))
                        swapped |= harder
                logs["swapped"] = swapped.float().mean().item()  # the share of samples a swap made harder
        delta, emb_adv, ce_adv = delta.detach(), emb_adv.detach(), ce_adv.detach()
        logs.update(adv=ce_adv.mean().item())
        if perturb_at == "vq":  # the share of tokens whose code the perturbation changed: does the projection keep it?
            logs["changed"] = umm.codes_changed(tokens, codes_adv).mean().item()
        laps["perturber"] = clock()

        # 5. mine: candidates, their consistency with the text, the hardest kept in the buffer
        if iter_num % mine_stride == 0 and not bad_G:  # not from a pass that went non-finite
            with torch.no_grad(), ctx:
                ref = umm.image_embeds(pixels).mean(1)  # s is measured against the real image of the same text
                cands = []  # (understanding embeds, pixels, CE, what the buffer stores of each candidate)
                if mine == "decode":  # this batch's adversarial images, plus other draws: direction jitter, or fresh noise
                    clean_u8 = umm.to_uint8(pixels) if perturb_at == "aligner" else None
                    for k in range(cand_k):
                        t = tokens + (delta if k == 0 else perturber(tokens, **seen) if perturber.noise_dim else jitter(delta, cand_noise))
                        e, px, codes = (emb_adv, px_adv, codes_adv) if k == 0 else umm.perturbed_view(t, perturb_at)
                        ce = ce_adv if k == 0 else umm.answer_loss(e, questions, answers)
                        store = {"codes": codes} if perturb_at == "vq" else {"image": clean_u8, "delta": (t - tokens).half()}
                        cands.append((e, px, ce, store))
                else:  # 'generate': the generation branch draws images of the text, the perturber steering each token
                    prompts = [c or q for c, q in zip(captions, questions)]
                    for k in range(cand_k):
                        e, px, store = umm.generated_view(prompts, perturb_at, draw_delta, gen_cfg, gen_temperature)
                        cands.append((e, px, umm.answer_loss(e, questions, answers), store))
                ce = torch.cat([c[2] for c in cands]).float()
                if clip_score:  # consistency of each candidate image with its text
                    texts = [c or f"{q} {a}" for c, q, a in zip(captions, questions, answers)] * cand_k
                    s = clip_score(torch.cat([c[1] for c in cands]).float() * umm.image_std + umm.image_mean, texts)
                else:  # built in: how far the candidate drifted from the real image, in the model's own embedding
                    s = F.cosine_similarity(torch.cat([c[0].mean(1) for c in cands]).float(), ref.float().repeat(cand_k, 1))
                H = hardness(ce, s, lambda_c, tau)
                keep = select_hard(H, s, torch.arange(B, device=device).repeat(cand_k), q_hard, hard_topk, tau, buffer_rule)
                if mine_log:  # every candidate, kept or not: the hardness distribution (eval.py --curves draws it)
                    checkpoint.log_candidates(os.path.join(out_dir, f"mining{rank}.jsonl"), iter_num + 1, batch["sources"], ce, s, H, keep)
                items = []
                for j in keep.tolist():
                    k, i = divmod(j, B)
                    # clone: an item owns its tensors, rather than keeping its whole batch alive as a view
                    items.append({**{key: v[i].cpu().clone() for key, v in cands[k][3].items()}, "question": questions[i],
                                  "answer": answers[i], "source": batch["sources"][i], "ce": ce[j].item(), "s": s[j].item()})
                buffer.push(H[keep].cpu(), items)
            logs.update(s=s.mean().item(), kept=len(items), buffer=len(buffer))
        laps["mine"] = clock()

    # 6. the understanding step: w_clean * CE(clean) + CE(hard samples from the buffer), one backward
    hard = buffer.sample(hard_bs) if game else []
    umm.train()
    with ctx:
        emb = umm.image_embeds(pixels)
        if hard:
            emb = torch.cat([emb, umm.buffered_embeds(hard)])
        ce = umm.answer_loss(emb, questions + [h["question"] for h in hard], answers + [h["answer"] for h in hard])
        loss = w_clean * ce[:B].mean() + (ce[B:].mean() if hard else 0.0)
        logs["und"] = ce[:B].mean().item()
        if game:  # is the game played? the adversary's images against the clean ones, on the same batch
            logs["gap"] = logs["adv"] - logs["und"]
        if hard:  # the hard samples trained on: how many, and how hard they still are
            logs.update(hard=ce[B:].mean().item(), n_hard=len(hard))
        if w_gen:  # text-to-image on the first gen_bs samples, keeping generation trained
            n = min(gen_bs or B, B)
            ce_gen = umm.text_to_image_loss(captions[:n], pixels[:n], gen_uncond_p).mean()
            loss = loss + w_gen * ce_gen
            logs["gen"] = ce_gen.item()
    loss = loss * float("nan") if poisoned else loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ranks.average_grads(params.values())
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    bad_D = ranks.nonfinite(device, loss=loss.detach(), grad_norm=grad_norm)
    if not bad_D:  # skipped, like the perturber's, on a non-finite loss or gradient
        optimizer.step()
    laps["understand"] = clock()
    iter_num += 1
    bar.update(1)
    # non-finite steps: each is counted and logged; max_bad_steps in a row stop the run. The skipped updates left
    # the parameters as they were, so the checkpoints (never written with non-finite values) are good ones.
    bad = bad_G + bad_D
    bad_steps, bad_in_row = bad_steps + bool(bad), bad_in_row + 1 if bad else 0
    if bad:
        log(iter=iter_num, skipped_update=bad, bad_steps=bad_steps)
    if bad_in_row >= max_bad_steps:
        msg = (f"stopping at iter {iter_num}: {bad_in_row} steps in a row with non-finite values (this one: {', '.join(bad)}); "
               f"their updates were skipped, and the last checkpoint, {ckpt_dir}, is intact")
        log(iter=iter_num, stopped=msg)
        stop(msg)
    if ddp and ddp_check_interval and iter_num % ddp_check_interval == 0:
        ranks.check_identical(trained, f"iter {iter_num}")

    marks = list(laps.values())  # each phase's time since the one before, and the whole step's, wall and CPU ms (bench.py)
    timing = {key: {**{name: round(1e3 * (b[i] - a[i]), 1) for name, a, b in zip(list(laps)[1:], marks, marks[1:])},
                    "step": round(1e3 * (marks[-1][i] - marks[0][i]), 1)} for i, key in enumerate(("ms", "cpu_ms"))}
    if flop_counter:
        flop_counter.__exit__(None, None, None)
        timing["flops"] = flop_counter.get_total_flops()
    if device_type == "cuda":
        timing["mem_gb"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    timing["graphs"] = compiled_graphs() if compile else 0  # built by torch.compile so far: a step that compiles shows
    if master and (iter_num % log_interval == 0 or iter_num == max_iters):
        logs = {"iter": iter_num, "lr": lr_at(iter_num - 1), "loss": loss.item(), "grad_norm": grad_norm.item(), **logs,
                "bad_steps": bad_steps, "skipped": len(skipped), "time": round(time.time() - t0, 1), **timing}
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("und", "gap", "changed", "eps", "buffer", "hard", "gen")
                         or k in ("bad_steps", "skipped") and v})
        log(**logs)
    if master and ((eval_interval and iter_num % eval_interval == 0) or iter_num == max_iters):
        umm.eval()
        res = evaluate(umm, eval_records, gen_n=eval_n // 4 if dataset == "shapes" and w_gen else 0)
        bar.write(f"iter {iter_num}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        log(iter=iter_num, eval=res)
    if ckpt_interval and (iter_num % ckpt_interval == 0 or iter_num == max_iters):
        save(iter_num)  # on every rank: each writes its own buffer, RNG and place in the data
bar.close()
t_train = time.time() - t0

# ---- the end report -----------------------------------------------------------------------------
skipped_by_all = ranks.gather(skipped)  # every rank meets its own
if master:
    for line in (data.describe_skips(skipped_by_all, "in training"), data.describe_skips(data.skipped, "when reading the data")):
        if line:
            print(line)
    if bad_steps:
        print(f"skipped the updates of {bad_steps} steps with non-finite losses or gradients (see {log_path})")
    if export_dir:
        umm.save_pretrained(export_dir, dtype=getattr(torch, export_dtype))
        if game:
            save_perturber(perturber, export_dir, perturb_at=perturb_at)
        print(f"exported the model{' and the perturber' if game else ''} to {export_dir}")
    after = summary(umm, eval_records, *table_args)
    print(f"done: {iter_num - start_iter} iteration{'s' * (iter_num - start_iter != 1)} (iter {start_iter} to {iter_num}) in {t_train:.0f}s"
          + (f"; checkpoint in {ckpt_dir}" if ckpt_interval else ""))
    print(table(before, after, f"at iter {start_iter}" if resume else "before", len(eval_records)))  # resumed: at its checkpoint
    log(iter=iter_num, summary={"before": before, "after": after, "before_iter": start_iter, "eval_set": eval_set})
if ddp:
    dist.destroy_process_group()
