"""
What the game costs. Times, after warm-up, with device synchronisation, as medians over repeats:

    sft                train.py's step 6 with the game off: understanding CE + backward + AdamW step
    sft_hard           the same at batch + hard_bs: as many samples as UniGame's understanding step trains on
    sft_2x             the same at twice the batch
    unigame_decode     train.py's steps 1-6 with mine='decode' (the default)
    unigame_generate   the same with mine='generate'
    generate_dynamic   image generation, UMM.generate_images with the dynamic KV cache
    generate_static    the same with the static KV cache (and, on CUDA, the compiled decode step)

and reports step time, samples/s, peak memory and, on CUDA, model FLOPs utilisation and the compile
speed-up over eager. It prints a table; its last line is one JSON object with every figure.

    python bench.py                                   # tiny: assets/shapes-base + LoRA r=16, batch 16
    OMP_NUM_THREADS=1 python bench.py --threads=1     # how BENCHMARKS.md's CPU figures were taken
    python bench.py --preset=janus-pro-1b             # the Janus-Pro-1B architecture, random weights (GPU)
    python bench.py --preset=janus-pro-7b             # 7B: LoRA + gradient checkpointing (GPU)

The steps are train.py's, written out again (with train.py's defaults) so that their phases can be
timed apart and so that they run on models that have no weights. When train.py's loop changes, change
them here too.
"""

import json
import os
import resource
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
from buffer import HardBuffer, hardness, select_hard
from model import IMAGE, JANUS_SYSTEM_PROMPT, UMM, add_lora, build_tokenizer
from perturber import Perturber, regularizer

# -----------------------------------------------------------------------------------------------
preset = "tiny"  # 'tiny' | 'janus-pro-1b' | 'janus-pro-7b'
benchmarks = "sft,sft_hard,sft_2x,unigame_decode,unigame_generate,generate_dynamic,generate_static"
batch_size = None  # None: the preset's (tiny 16, janus-pro-1b 8, janus-pro-7b 4)
gen_batch = None  # captions per generate_images call; None: batch_size
gen_cfg = 5.0  # guidance of the throughput figure (Janus-Pro samples with 5; it doubles the decode batch)
warmup = 2
repeats = 5
# the step being timed: train.py's defaults
lora_r = 16
perturb_at = "vq"  # 'vq' (train.py's default: decoded images) | 'aligner' (the Janus-Pro configs: cheaper)
hard_bs = None  # None: the preset's (8; janus-pro-7b 6, as config/unigame_janus_pro_7b.py)
cand_k = 2
mine_cfg = None  # guidance of mine='generate'; None: train.py's gen_cfg (1.0) for tiny, the Janus-Pro configs' 5.0
gradient_checkpointing = None  # None: the preset's (on for janus-pro-7b)
n_layer = None  # LM and vision layers; None: the architecture's. Fewer: a quick smoke run of a big preset
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # CUDA: autocast dtype, and the big presets' frozen weights
compile = torch.cuda.is_available()  # time eager, then compiled (the modules train.py compiles)
allow_cpu = False  # let a janus-pro preset run on CPU: only for smoke runs (n_layer, batch_size, repeats small)
threads = 0  # CPU threads for torch (0: torch's default)
seed = 0
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------------------------

# Janus-Pro's language models (DeepSeek-LLM 1.3B / 7B). Everything else -- SigLIP-L/16 at 384 (576
# tokens), the aligners, the VQ model (16384 codes of dim 8, 24 x 24 latent grid) and the generation
# head -- is transformers' Janus configuration defaults, which mirror Janus-Pro, at the LM's width.
ARCHS = {
    "janus-pro-1b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5632),
    "janus-pro-7b": dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, intermediate_size=11008),
}
PRESET_BATCH = {"tiny": 16, "janus-pro-1b": 8, "janus-pro-7b": 4}
# dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name; first match wins
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
ALL = ["sft", "sft_hard", "sft_2x", "unigame_decode", "unigame_generate", "generate_dynamic", "generate_static"]

if preset not in PRESET_BATCH:
    raise SystemExit(f"config error: preset={preset!r}: expected one of {', '.join(PRESET_BATCH)}")
chosen = [b for b in benchmarks.split(",") if b]
if perturb_at not in ("vq", "aligner"):
    raise SystemExit(f"config error: perturb_at={perturb_at!r}: expected 'vq' or 'aligner'")
if any(b not in ALL for b in chosen):
    raise SystemExit(f"config error: benchmarks={benchmarks!r}: choose from {', '.join(ALL)}")
device_type = "cuda" if device.startswith("cuda") else "cpu"
if preset != "tiny" and device_type == "cpu" and not allow_cpu:
    raise SystemExit(f"bench: preset {preset} is a {'1' if '1b' in preset else '7'}B-parameter model and needs a GPU "
                     f"(no CUDA device here). For a CPU smoke run only: --allow_cpu=True --n_layer=1 --batch_size=1 "
                     f"--repeats=1 --warmup=0")
B = batch_size or PRESET_BATCH[preset]
hard_bs = hard_bs if hard_bs is not None else 6 if preset == "janus-pro-7b" else 8
mine_cfg = mine_cfg if mine_cfg is not None else 1.0 if preset == "tiny" else 5.0
gen_B = gen_batch or B
checkpointing = preset == "janus-pro-7b" if gradient_checkpointing is None else gradient_checkpointing
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == "cuda" else nullcontext()
HERE = os.path.dirname(os.path.abspath(__file__))


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


# ---- the model ----------------------------------------------------------------------------------

def janus_pro(arch, tok):
    """A random-initialised Janus-Pro of the named architecture, built on `device` directly (the CPU
    never holds a copy); frozen weights in the autocast dtype on CUDA, as Janus-Pro is loaded for
    training with LoRA."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig
    lm = {**ARCHS[arch], **({"num_hidden_layers": n_layer} if n_layer else {})}
    text = LlamaConfig(vocab_size=102400, max_position_embeddings=16384, rms_norm_eps=1e-6,
                       num_key_value_heads=lm["num_attention_heads"], pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **lm)
    width = lm["hidden_size"]
    vision = JanusVisionConfig(projection_dim=width, **({"num_hidden_layers": n_layer} if n_layer else {}))
    config = JanusConfig(text_config=text, vision_config=vision,
                         vq_config=JanusVQVAEConfig(projection_dim=width, image_token_embed_dim=width),
                         image_token_id=tok.convert_tokens_to_ids(IMAGE), tie_word_embeddings=False)
    weights = getattr(torch, dtype) if device_type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(weights)
    try:
        with torch.device(device):
            janus = JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return UMM(janus, tok, system_prompt=JANUS_SYSTEM_PROMPT)


records = data.shapes_world("train", max(2 * B, B + hard_bs, gen_B), seed=0)
if preset == "tiny":
    umm = UMM.from_pretrained(os.path.join(HERE, "assets/shapes-base")).to(device)
else:
    # our tokenizer, taught the system prompt's words so that prompts are about as long as with DeepSeek's
    corpus = [r["question"] for r in records] + [r["caption"] for r in records] + [JANUS_SYSTEM_PROMPT] * 20
    umm = janus_pro(preset, build_tokenizer(corpus, 1024))
if checkpointing:
    umm.janus.gradient_checkpointing_enable()
# what trains: LoRA on the LM projections, as train.py's default (train_modules='')
umm.requires_grad_(False)
lora = add_lora(umm.janus.model.language_model, lora_r, 32, 0.05)
for p in lora:
    p.data = p.data.float()  # trained tensors in float32 (AdamW moments too), even where frozen weights are bf16
decay, no_decay = [p for p in lora if p.dim() >= 2], [p for p in lora if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=5e-4, betas=(0.9, 0.95))
token_dim = umm.codebook.shape[1] if perturb_at == "vq" else umm.janus.config.text_config.hidden_size
perturber = Perturber(token_dim, eps_min=0.0, eps_max=0.3, eps_init=0.15, relative=True).to(device)
opt_G = torch.optim.AdamW(perturber.parameters(), lr=1e-2, weight_decay=0.0)
grid = (umm.grid, umm.grid)
n_params = sum(p.numel() for p in umm.parameters())


def batch_of(n):
    """A fixed batch: the same samples every step, so every step has the same shapes (data loading
    and preprocessing are the loader's cost, the same for SFT and UniGame, and are left out)."""
    rs = records[:n]
    pixels = umm.preprocess([r["image"] for r in rs])
    return pixels, [r["question"] for r in rs], [r["answers"][0] for r in rs], [r["caption"] for r in rs]


batches = {n: batch_of(n) for n in {B, B + hard_bs, 2 * B, gen_B}}

# A full hard buffer (train.py's capacity), so that every timed step pops hard_bs samples whatever
# mining kept: items are made of the batch's own samples, with random hardness.
buffer = HardBuffer(4096, 1.75)
with torch.no_grad():
    pixels, questions, answers, _ = batches[B]
    if perturb_at == "vq":
        stored = [{"codes": c.clone()} for c in umm.image_codes(pixels).cpu()]
    else:  # one zero delta shared by all: 4096 of Janus-Pro's (576, 2048) deltas would take 4.8 GB
        zero = torch.zeros(umm.num_image_tokens, umm.janus.config.text_config.hidden_size, dtype=torch.float16)
        stored = [{"image": im, "delta": zero} for im in umm.to_uint8(pixels)]
buffer.push(torch.rand(4096), [{**stored[i % B], "question": questions[i % B], "answer": answers[i % B], "source": "bench"}
                               for i in range(4096)])


# ---- the steps ----------------------------------------------------------------------------------

def stamp():
    """(wall, CPU) seconds. Wall time, device-synchronised, is what a step costs. On a CPU shared with
    other jobs, this process's CPU time is also kept: single-threaded, it is the wall time an idle core
    would take, whatever the other jobs do."""
    sync()
    return time.perf_counter(), time.process_time()


def medians(pairs):
    return tuple(statistics.median(x) for x in zip(*pairs))


class Laps:
    """Splits a step into phases: lap(name) records the (wall, CPU) time since the last lap."""

    def __init__(self):
        self.times, self.on = {}, False

    def start(self):
        self.t = stamp()

    def lap(self, name):
        t = stamp()
        if self.on:
            self.times.setdefault(name, []).append((t[0] - self.t[0], t[1] - self.t[1]))
        self.t = t

    def medians(self):
        return {k: medians(v) for k, v in self.times.items()}


def understanding_step(pixels, questions, answers, hard):
    """train.py's step 6: w_clean * CE(clean) + CE(hard samples), one backward, clip, AdamW."""
    n = len(questions)
    with ctx:
        emb = umm.image_embeds(pixels)
        if hard:
            emb = torch.cat([emb, umm.buffered_embeds(hard)])
        ce = umm.answer_loss(emb, questions + [h["question"] for h in hard], answers + [h["answer"] for h in hard])
        loss = ce[:n].mean() + (ce[n:].mean() if hard else 0.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora, 1.0)
    optimizer.step()


def sft_step(n):
    pixels, questions, answers, _ = batches[n]

    def step():
        umm.train()
        understanding_step(pixels, questions, answers, [])
    return step


def unigame_step(mine, laps):
    """train.py's steps 1-6 (mine_stride=1, built-in consistency score), timed in four phases."""
    pixels, questions, answers, captions = batches[B]

    def step():
        umm.train()
        laps.start()
        with ctx:
            with torch.no_grad():
                tokens = umm.visual_tokens(pixels, perturb_at)                   # 1. encode
            delta = perturber(tokens)                                            # 2. perturb
            emb_adv, px_adv = umm.perturbed_view(tokens + delta, perturb_at)     # 3. project, decode
            ce_adv = umm.answer_loss(emb_adv, questions, answers)                # 4. the perturber's move
            loss_G = -100.0 * ce_adv.mean() + regularizer(delta, perturber.eps, 1e-3, 1e-3, 1e-3, grid)
        laps.lap("perturber forward")
        for p, g in zip(perturber.parameters(), torch.autograd.grad(loss_G, list(perturber.parameters()))):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(perturber.parameters(), 1.0)
        opt_G.step()
        opt_G.zero_grad(set_to_none=True)
        laps.lap("perturber backward + step")
        with torch.no_grad(), ctx:                                               # 5. mine
            ref = umm.image_embeds(pixels).mean(1)
            cands = []
            if mine == "decode":
                clean_u8 = umm.to_uint8(pixels) if perturb_at == "aligner" else None
                for k in range(cand_k):
                    t = tokens + (delta.detach() if k == 0 else perturber(tokens, noise_std=0.3))
                    e, px = (emb_adv.detach(), px_adv) if k == 0 else umm.perturbed_view(t, perturb_at)
                    ce = ce_adv.detach() if k == 0 else umm.answer_loss(e, questions, answers)
                    store = ({"codes": umm.project_to_codebook(t)[1]} if perturb_at == "vq" else
                             {"image": clean_u8, "delta": (t - tokens).half()})
                    cands.append((e, px, ce, store))
            else:
                for k in range(cand_k):
                    hook = (lambda v: v + perturber(v)) if perturb_at == "vq" else None
                    codes = umm.generate_images(captions, mine_cfg, 1.0, token_hook=hook)
                    px = umm.decode_codes(codes).clamp(-1, 1)
                    e = umm.image_embeds(px)
                    if perturb_at == "vq":
                        store = {"codes": codes}
                    else:
                        d = perturber(e, noise_std=0.3)
                        e, store = e + d, {"image": umm.to_uint8(px), "delta": d.half()}
                    cands.append((e, px, umm.answer_loss(e, questions, answers), store))
            ce = torch.cat([c[2] for c in cands]).float()
            s = F.cosine_similarity(torch.cat([c[0].mean(1) for c in cands]).float(), ref.float().repeat(cand_k, 1))
            H = hardness(ce, s, 1.0, 0.9)
            keep = select_hard(H, s, torch.arange(B, device=device).repeat(cand_k), 0.75, 2, 0.9, "consistent")
            items = []
            for j in keep.tolist():
                k, i = divmod(j, B)
                items.append({**{key: v[i].cpu().clone() for key, v in cands[k][3].items()},
                              "question": questions[i], "answer": answers[i], "source": "bench"})
            buffer.push(H[keep].cpu(), items)
        laps.lap("mine")
        understanding_step(pixels, questions, answers, buffer.sample(hard_bs))  # 6. understanding step
        laps.lap("understanding step")
    return step


def generate(static):
    captions = batches[gen_B][3]

    def step():
        umm.eval()
        with ctx:  # on CUDA the frozen weights are bf16 and the LoRA float32: autocast makes them meet
            umm.generate_images(captions, cfg_scale=gen_cfg, temperature=1.0, static_cache=static,
                                generator=torch.Generator(device).manual_seed(seed))
    return step


# ---- measuring ----------------------------------------------------------------------------------

def measure(steps, n_warmup, n_repeat, laps):
    """Median (wall, CPU) seconds per call of each step and, on CUDA, its peak memory (GiB: allocated by
    tensors, and held by the caching allocator, which is what must fit). The steps are called
    round-robin, so that load from other processes on the machine falls on all of them alike."""
    for _ in range(n_warmup):
        for fn in steps.values():
            fn()
    sync()
    for lp in laps.values():
        lp.on, lp.times = True, {}
    times, peaks = {name: [] for name in steps}, {}
    for _ in range(n_repeat):
        for name, fn in steps.items():
            if device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = stamp()
            fn()
            t2 = stamp()
            times[name].append((t2[0] - t[0], t2[1] - t[1]))
            if device_type == "cuda":
                now = (torch.cuda.max_memory_allocated() / 2 ** 30, torch.cuda.max_memory_reserved() / 2 ** 30)
                peaks[name] = tuple(max(a, b) for a, b in zip(peaks.get(name, (0, 0)), now))
    for lp in laps.values():
        lp.on = False
    return {name: medians(ts) for name, ts in times.items()}, peaks


def count_flops(fn):
    """FLOPs of one eager call of fn, as torch's FlopCounterMode counts them (matmuls, attention,
    convolutions, forward and backward). Gradient checkpointing is off for the count: its recomputation
    is not model work, so that MFU is model FLOPs utilisation, not hardware utilisation."""
    from torch.utils.flop_counter import FlopCounterMode
    if checkpointing:
        umm.janus.gradient_checkpointing_disable()
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        sync()
        return counter.get_total_flops()
    except torch.cuda.OutOfMemoryError:
        print("FLOP count skipped: the step does not fit without gradient checkpointing")
        return None
    finally:
        if checkpointing:
            umm.janus.gradient_checkpointing_enable()
        if device_type == "cuda":
            torch.cuda.empty_cache()


def peak_flops():
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


laps = {"unigame_decode": Laps(), "unigame_generate": Laps()}
makers = {"sft": lambda: sft_step(B), "sft_hard": lambda: sft_step(B + hard_bs), "sft_2x": lambda: sft_step(2 * B),
          "unigame_decode": lambda: unigame_step("decode", laps["unigame_decode"]),
          "unigame_generate": lambda: unigame_step("generate", laps["unigame_generate"]),
          "generate_dynamic": lambda: generate(False), "generate_static": lambda: generate(True)}
steps = {name: makers[name]() for name in chosen}
seq_len = max(len(umm.prompt_ids(q)) + len(umm.answer_ids(a)) for q, a in zip(*batches[B][1:3]))
print(f"bench: {preset} | {n_params / 1e6:.1f}M parameters, LoRA r={lora_r} ({sum(p.numel() for p in lora) / 1e6:.2f}M trained)"
      f"{', gradient checkpointing' if checkpointing else ''} | perturb_at={perturb_at}, batch {B}, hard_bs {hard_bs}, cand_k {cand_k}, "
      f"understanding sequence {seq_len} tokens, {umm.num_image_tokens} image tokens | {device}"
      f"{' ' + torch.cuda.get_device_name(device) if device_type == 'cuda' else ''}, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads | warm-up {warmup}, median of {repeats}")

# FLOPs: counted once per training step, eagerly, before anything is compiled
peak = peak_flops()
flops = {}
if peak:
    for name in [n for n in ("sft", "sft_hard", "sft_2x", "unigame_decode") if n in steps]:
        steps[name]()  # the first call runs lazy initialisation outside the count
        flops[name] = count_flops(steps[name])
eager, peaks = measure(steps, warmup, repeats, laps)
timed, phase_times = eager, {k: lp.medians() for k, lp in laps.items()}
if compile:
    # the modules train.py compiles; generate_images compiles its own decode step (static cache, CUDA)
    umm.janus.model.language_model.compile()
    umm.janus.model.vision_model.compile()
    timed, peaks = measure(steps, max(warmup, 2), repeats, laps)
    phase_times = {k: lp.medians() for k, lp in laps.items()}

# ---- report -------------------------------------------------------------------------------------

cpu = device_type == "cpu"  # on CPU every figure is also given in process CPU time (see stamp)


def ratios_of(clock):
    """The issue's ratios, from wall (clock=0) or CPU (clock=1) times."""
    t = {name: v[clock] for name, v in timed.items()}
    mine = {name: ph["mine"][clock] for name, ph in phase_times.items() if "mine" in ph}
    out = {}
    for other in ("sft", "sft_hard", "sft_2x"):
        if other in t and "unigame_decode" in t:
            out[f"unigame_decode_over_{other}"] = t["unigame_decode"] / t[other]
    if "sft" in t and "unigame_generate" in t:
        out["unigame_generate_over_sft"] = t["unigame_generate"] / t["sft"]
    if len(mine) == 2:  # one mined candidate: the mining phase over the B * cand_k candidates it scores
        out["ms_per_candidate_decode"] = 1e3 * mine["unigame_decode"] / (B * cand_k)
        out["ms_per_candidate_generate"] = 1e3 * mine["unigame_generate"] / (B * cand_k)
        out["generate_over_decode_per_candidate"] = mine["unigame_generate"] / mine["unigame_decode"]
    if "generate_dynamic" in t and "generate_static" in t:
        out["static_over_dynamic_speedup"] = t["generate_dynamic"] / t["generate_static"]
    return out


tokens_per_image = umm.num_image_tokens
results = {}
for name in steps:
    t, t_cpu = timed[name]
    n = {"sft_hard": B + hard_bs, "sft_2x": 2 * B}.get(name, gen_B if name.startswith("generate") else B)
    r = {"batch": n, "ms": 1e3 * t, "samples_per_s": n / t}
    if cpu:
        r["cpu_ms"] = 1e3 * t_cpu
    if name.startswith("generate"):
        r["tokens_per_s"] = n * tokens_per_image / t
    if name in peaks:
        r["peak_mem_gb"], r["peak_reserved_gb"] = peaks[name]
    if flops.get(name):
        r["tflops"] = flops[name] / 1e12
        r["mfu"] = flops[name] / t / peak
    if compile:
        r["eager_ms"] = 1e3 * eager[name][0]
        r["compile_speedup"] = eager[name][0] / t
    if name in phase_times:
        r["phases_ms"] = {k: 1e3 * v[0] for k, v in phase_times[name].items()}
        if cpu:
            r["phases_cpu_ms"] = {k: 1e3 * v[1] for k, v in phase_times[name].items()}
    results[name] = r
ratios = ratios_of(0)
ratios_cpu_time = ratios_of(1) if cpu else {}
peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux

print()
head = f"{'benchmark':<18}{'batch':>6}{'ms':>10}" + (f"{'cpu ms':>10}" if cpu else "") + f"{'samples/s':>11}{'tokens/s':>10}"
if not cpu:
    head += f"{'alloc GB':>9}{'held GB':>9}{'MFU':>7}"
if compile:
    head += f"{'eager ms':>10}{'compile x':>10}"
print(head)
for name, r in results.items():
    line = f"{name:<18}{r['batch']:>6}{r['ms']:>10.1f}" + (f"{r['cpu_ms']:>10.1f}" if cpu else "")
    line += f"{r['samples_per_s']:>11.2f}" + (f"{r['tokens_per_s']:>10.0f}" if "tokens_per_s" in r else f"{'-':>10}")
    if not cpu:
        line += f"{r['peak_mem_gb']:>9.2f}{r['peak_reserved_gb']:>9.2f}" + (f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'-':>7}")
    if compile:
        line += f"{r['eager_ms']:>10.1f}{r['compile_speedup']:>9.2f}x"
    print(line)
for name, r in results.items():
    for key in ("phases_ms", "phases_cpu_ms"):
        if key in r:
            print(f"  {name} {key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items()))
for k in ratios:
    print(f"  {k}: {ratios[k]:.2f}" + (f"  (CPU time: {ratios_cpu_time[k]:.2f})" if cpu else ""))
if cpu:
    print(f"  peak memory (process RSS): {peak_rss_gb:.2f} GB")
print(json.dumps({"preset": preset, "device": device if cpu else torch.cuda.get_device_name(device),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "perturb_at": perturb_at, "batch_size": B,
                  "hard_bs": hard_bs, "cand_k": cand_k, "mine_cfg": mine_cfg, "seq_len": seq_len,
                  "image_tokens": tokens_per_image, "params_m": n_params / 1e6, "gradient_checkpointing": checkpointing,
                  "compile": compile, "dtype": "float32" if cpu else dtype, "warmup": warmup, "repeats": repeats,
                  "peak_rss_gb": peak_rss_gb, "results": results, "ratios": ratios, "ratios_cpu_time": ratios_cpu_time}))
