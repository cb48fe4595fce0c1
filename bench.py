"""
What the game costs. Each training benchmark is a run of train.py itself, timed by train.py's own
stopwatch (its log.jsonl records every step's phases in wall and process-CPU milliseconds,
device-synchronised); bench.py drops the warm-up steps and reports medians:

    sft                train.py with the game off (--game=False): understanding CE + backward + AdamW step
    sft_hard           the same at batch + hard_bs: as many samples as UniGame's understanding step trains on
    sft_2x             the same at twice the batch
    unigame_decode     train.py's steps 1-6 with mine='decode' (the default)
    unigame_generate   the same with mine='generate'
    generate_dynamic   image generation, UMM.generate_images with the dynamic KV cache
    generate_static    the same with the static KV cache (and, on CUDA, the compiled decode step)
    vq                 the VQ model's work in one perturb_at='vq' UniGame step, timed alone: its share of that step

and reports step time, samples/s, each phase (perturber: steps 1-4 and the perturber's update; mine:
step 5; understand: step 6), peak memory and, on CUDA, model FLOPs utilisation and the compile
speed-up over eager. With compile (CUDA's default) a training benchmark is one train.py run with
--compile=False and one with --compile=True (time_eager=False: the compiled one alone); on a GPU of known peak, one more, of a single eager step,
counts its FLOPs (train.py --count_flops=True). It prints a table; its last line is one JSON object
with every figure.

    python bench.py                                   # tiny: assets/shapes-base + LoRA r=16, batch 16
    OMP_NUM_THREADS=1 python bench.py --threads=1     # how BENCHMARKS.md's CPU figures were taken
    python bench.py --preset=janus-pro-1b             # the Janus-Pro-1B architecture, random weights (GPU)
    python bench.py --preset=janus-pro-7b             # 7B: LoRA + gradient checkpointing (GPU)
    python bench.py --gpu_suite=True                  # the GPU path in one command, one table (sized for 8 min on one H100/H200)
    python bench.py --check_losses=True --compile=True   # bf16 and compiled train.py against eager float32; graphs per step

What a timed step is, being train.py's: real training on train.py's data (the built-in world through
its loader, a fresh shuffled batch every step, so prompt lengths vary from step to step), from
preprocessing the batch's images to the optimizer's step, with everything train.py does in between
(logging's .item() calls, the non-finite checks). Fetching the batch from the loader comes just before
train.py's stopwatch starts and is not in it. The hard samples of step 6 are those mining put in the
buffer (train.py logs how many: n_hard, reported as hard_per_step). A training benchmark's peak memory
is train.py's torch.cuda.max_memory_reserved over its run (its evaluations, on eval_n=4 samples,
included). The janus-pro presets are built with random weights once, saved under cache_dir (reused
while the architecture is the same), and train.py is run on that directory. The runs follow one
another: on a machine shared with other jobs, compare the CPU times (cpu ms), which for a
single-threaded run are the time an idle core would take whatever the other jobs do.
"""

import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

import torch

import data
from model import IMAGE, JANUS_SYSTEM_PROMPT, UMM, build_tokenizer

# -----------------------------------------------------------------------------------------------
preset = "tiny"  # 'tiny' | 'janus-pro-1b' | 'janus-pro-7b'
benchmarks = "sft,sft_hard,sft_2x,unigame_decode,unigame_generate,generate_dynamic,generate_static,vq"
batch_size = None  # None: the preset's (tiny 16, janus-pro-1b 8, janus-pro-7b 4)
gen_batch = None  # captions per generate_images call; None: batch_size
gen_cfg = 5.0  # guidance of the throughput figure (Janus-Pro samples with 5; it doubles the decode batch)
warmup = 2  # train.py steps left out before the timed ones
repeats = 5  # timed train.py steps (medians)
# the step being timed: train.py's defaults, passed to it
lora_r = 16
perturb_at = "vq"  # 'vq' (train.py's default: decoded images) | 'aligner' (the Janus-Pro configs: cheaper)
hard_bs = None  # None: the preset's (8; janus-pro-7b 6, as config/unigame_janus_pro_7b.py)
cand_k = 2
mine_cfg = None  # train.py's gen_cfg for mine='generate'; None: train.py's 1.0 for tiny, the Janus-Pro configs' 5.0
gradient_checkpointing = None  # None: the preset's (on for janus-pro-7b)
n_layer = None  # LM and vision layers of a janus-pro preset; None: the architecture's. Fewer: a quick smoke run
cache_dir = "out/bench"  # where the random janus-pro models are saved (and reused) for train.py to load
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype ('float32': none); on CUDA also the big presets' frozen weights
compile = torch.cuda.is_available()  # time compiled (train.py --compile: the LM, vision tower and VQ encoder / decoder)
time_eager = True  # with compile: time each benchmark eager too, for the compile speed-up (False: compiled only, as the GPU suite does)
mfu = True  # on a GPU of known peak, count one eager step's FLOPs for the MFU (one more train.py run per benchmark)
allow_cpu = False  # let a janus-pro preset run on CPU: only for smoke runs (n_layer, batch_size, repeats small)
threads = 0  # CPU threads for torch, here and in train.py (0: torch's default)
seed = 0
# instead of the benchmarks: the GPU suite, or the loss check (BENCHMARKS.md: the GPU path)
gpu_suite = False  # every CUDA-only part in one command, one table: train.py compiled + bf16 under torchrun, the presets' figures
suite_presets = "janus-pro-1b,janus-pro-7b"  # the suite's two model sizes (its CPU dry run: tiny,tiny)
suite_steps = 50  # train.py steps of the suite's run on the tiny base
suite_parts = "train,train_vq,train_aligner,generate,memory"  # which of the suite's parts to run (to rerun one that did not fit)
suite_budget_s = 480  # the suite's wall-clock budget: a part still running when it is spent is stopped and reported as such
check_losses = False  # train.py's losses in bf16 autocast (and, with compile, compiled) against eager float32, and graphs per step
# the loss check's tolerances: the largest relative difference of a logged loss from eager float32's, over the steps
check_tol = 0.05  # bf16 (eager or compiled): the clean understanding loss (SFT's loss, the game's und)
check_tol_game = 0.5  # bf16: the game's adversarial losses (adv_start, hard, loss): another path of the game (BENCHMARKS.md)
check_tol_fp32 = 1e-3  # compiled float32: every loss
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
TRAINING = ["sft", "sft_hard", "sft_2x", "unigame_decode", "unigame_generate"]
ALL = TRAINING + ["generate_dynamic", "generate_static", "vq"]

if preset not in PRESET_BATCH:
    raise SystemExit(f"config error: preset={preset!r}: expected one of {', '.join(PRESET_BATCH)}")
chosen = [b for b in benchmarks.split(",") if b]
if perturb_at not in ("vq", "aligner"):
    raise SystemExit(f"config error: perturb_at={perturb_at!r}: expected 'vq' or 'aligner'")
if any(b not in ALL for b in chosen):
    raise SystemExit(f"config error: benchmarks={benchmarks!r}: choose from {', '.join(ALL)}")
if warmup < 0 or repeats < 1:
    raise SystemExit(f"config error: warmup={warmup}, repeats={repeats}: need warmup >= 0 and repeats >= 1")
if dtype not in ("float32", "bfloat16", "float16"):
    raise SystemExit(f"config error: dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
suite, SUITE_PARTS = suite_presets.split(","), ("train", "train_vq", "train_aligner", "generate", "memory")
problems = [msg for bad, msg in [
    (len(suite) != 2 or not set(suite) <= set(PRESET_BATCH), f"suite_presets={suite_presets!r}: expected two of {', '.join(PRESET_BATCH)}"),
    (not set(suite_parts.split(",")) <= set(SUITE_PARTS), f"suite_parts={suite_parts!r}: choose from {', '.join(SUITE_PARTS)}"),
    (suite_steps < 1, f"suite_steps={suite_steps}: must be >= 1"),
    (min(check_tol, check_tol_game, check_tol_fp32) <= 0, f"check_tol={check_tol}, check_tol_game={check_tol_game}, "
                                                          f"check_tol_fp32={check_tol_fp32}: must be > 0"),
    (gpu_suite and check_losses, "gpu_suite=True and check_losses=True: one at a time"),
] if bad]
if problems:
    raise SystemExit("\n".join(f"config error: {p}" for p in problems))
device_type = "cuda" if device.startswith("cuda") else "cpu"
if gpu_suite and device_type == "cpu" and not allow_cpu:
    raise SystemExit("bench: the GPU suite needs a GPU (no CUDA device here). For a CPU dry run of its plumbing only: "
                     "--allow_cpu=True --suite_presets=tiny,tiny --suite_steps=2 --batch_size=2 --warmup=0 --repeats=1")
if preset != "tiny" and device_type == "cpu" and not allow_cpu:
    raise SystemExit(f"bench: preset {preset} is a {'1' if '1b' in preset else '7'}B-parameter model and needs a GPU "
                     f"(no CUDA device here). For a CPU smoke run only: --allow_cpu=True --n_layer=1 --batch_size=1 "
                     f"--repeats=1 --warmup=0")
B = batch_size or PRESET_BATCH[preset]
hard_bs = hard_bs if hard_bs is not None else 6 if preset == "janus-pro-7b" else 8
mine_cfg = mine_cfg if mine_cfg is not None else 1.0 if preset == "tiny" else 5.0
gen_B = gen_batch or B
checkpointing = preset == "janus-pro-7b" if gradient_checkpointing is None else gradient_checkpointing
# frozen weights: the big presets in the autocast dtype on CUDA, as Janus-Pro is loaded for training with LoRA
weights = dtype if preset != "tiny" and device_type == "cuda" else "float32"
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()  # as train.py's
HERE = os.path.dirname(os.path.abspath(__file__))
cpu = device_type == "cpu"  # on CPU every figure is also given in process CPU time


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


# ---- the model: a directory train.py can load -----------------------------------------------------

def janus_pro(arch, tok):
    """A random-initialised Janus-Pro of the named architecture, built on `device` directly (the CPU
    never holds a copy), its weights in `weights`."""
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
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, weights))
    try:
        with torch.device(device):
            janus = JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return UMM(janus, tok, system_prompt=JANUS_SYSTEM_PROMPT)


def model_dir():
    """tiny: the shipped base. A janus-pro preset: its random-weight model, saved in cache_dir the first
    time and reused while the architecture (and weight dtype) is the same."""
    if preset == "tiny":
        return os.path.join(HERE, "assets/shapes-base")
    arch = {"preset": preset, "n_layer": n_layer, "weights": weights, "lm": ARCHS[preset], "seed": seed}
    path = os.path.abspath(os.path.join(cache_dir, f"{preset}{f'-{n_layer}layer' if n_layer else ''}-{weights}"))
    marker = os.path.join(path, "bench.json")
    if os.path.isfile(marker) and json.load(open(marker)) == arch:
        print(f"bench: reusing {path}")
        return path
    print(f"bench: building a random {preset}{f' of {n_layer} layer(s)' if n_layer else ''} in {path}")
    shutil.rmtree(path, ignore_errors=True)
    # our tokenizer, taught the system prompt's words so that prompts are about as long as with DeepSeek's
    records = data.shapes_world("train", 256, seed=0)
    corpus = [r["question"] for r in records] + [r["caption"] for r in records] + [JANUS_SYSTEM_PROMPT] * 20
    umm = janus_pro(preset, build_tokenizer(corpus, 1024))
    umm.save_pretrained(path)
    del umm
    if device_type == "cuda":
        torch.cuda.empty_cache()
    with open(marker, "w") as f:  # last: a directory without it is rebuilt
        json.dump(arch, f)
    return path


# ---- the training benchmarks: train.py runs --------------------------------------------------------

def batch_of(name):
    return {"sft_hard": B + hard_bs, "sft_2x": 2 * B}.get(name, gen_B if name.startswith("generate") else B)


def train(name, path, iters, **flags):
    """Run train.py for benchmark `name` (`iters` steps, each logged) and return its log's step records.
    A failed run stops bench with the end of train.py's output."""
    n = batch_of(name)
    game = name.startswith("unigame")
    args = dict(init_from=path, game=game, batch_size=n, max_iters=iters, train_n=n * iters, log_interval=1,
                ckpt_interval=0, eval_interval=0, eval_n=4, eval_adv_steps=0, lora_r=lora_r, perturb_at=perturb_at, hard_bs=hard_bs,
                cand_k=cand_k, gradient_checkpointing=checkpointing, load_dtype=weights, device=device, dtype=dtype,
                compile=compile, threads=threads, seed=seed)
    if game:
        args.update(mine=name.split("_")[1], gen_cfg=mine_cfg)
    args.update(flags)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={out}"] + [f"--{k}={v}" for k, v in args.items()]
        print(f"bench: {name}{' (compiled)' if args['compile'] else ''}{' (FLOP count)' if args.get('count_flops') else ''}: "
              f"{iters} train.py step(s)", flush=True)
        with tempfile.TemporaryFile() as report:
            p = subprocess.Popen(cmd, cwd=HERE, stdout=report, stderr=subprocess.PIPE)
            err = b""
            while chunk := p.stderr.read1(4096):  # its progress bars, passed on as they come, and kept
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                err += chunk
            p.wait()
            report.seek(0)
            output = (report.read() + err).decode(errors="replace")
        if p.returncode != 0:
            tail = "\n".join(line for line in output.replace("\r", "\n").splitlines() if line.strip())[-3000:]
            raise SystemExit(f"bench: {name}: train.py failed (exit {p.returncode}):\n  {' '.join(cmd)}\n{tail}")
        with open(os.path.join(out, "log.jsonl")) as f:
            steps = [rec for rec in map(json.loads, f) if "ms" in rec]
    if len(steps) != iters:
        raise SystemExit(f"bench: {name}: train.py logged {len(steps)} steps, expected {iters}")
    return steps


def medians(steps, key):
    """Per phase, the median over `steps` of rec[key][phase] (key: 'ms' or 'cpu_ms')."""
    return {k: statistics.median(s[key][k] for s in steps) for k in steps[0][key]}


def time_training(name, path, compiled):
    """{'ms', 'cpu_ms': phase -> median, 'mem_gb', 'hard'} of the timed steps of one train.py run, eager or
    compiled (compiling takes the first steps: at least 2 of warm-up)."""
    n_warmup = max(warmup, 2) if compiled else warmup
    steps = train(name, path, n_warmup + repeats, compile=compiled)[n_warmup:]
    return {"ms": medians(steps, "ms"), "cpu_ms": medians(steps, "cpu_ms"),
            "mem_gb": max(s.get("mem_gb", 0) for s in steps),
            "hard": statistics.median(s.get("n_hard", 0) for s in steps)}


def count_flops(name, path):
    """FLOPs of train.py's first step, as torch's FlopCounterMode counts them (matmuls, attention,
    convolutions, forward and backward), eager. Gradient checkpointing is off for the count: its
    recomputation is not model work, so that MFU is model FLOPs utilisation, not hardware utilisation."""
    try:
        return train(name, path, 1, count_flops=True, compile=False, gradient_checkpointing=False)[0]["flops"]
    except SystemExit as e:
        if "OutOfMemoryError" not in str(e):
            raise
        print(f"bench: {name}: FLOP count skipped: the step does not fit without gradient checkpointing")
        return None


def peak_flops():
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


# ---- the generation benchmarks: UMM.generate_images, timed here --------------------------------------

def stamp():
    """(wall, CPU) seconds, device-synchronised."""
    sync()
    return time.perf_counter(), time.process_time()


def measure(steps, n_warmup, n_repeat):
    """Median (wall, CPU) seconds per call of each step and, on CUDA, its peak memory (GiB: allocated by
    tensors, and held by the caching allocator, which is what must fit). The steps are called
    round-robin, so that load from other processes on the machine falls on all of them alike."""
    for _ in range(n_warmup):
        for fn in steps.values():
            fn()
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
    return {name: tuple(statistics.median(x) for x in zip(*ts)) for name, ts in times.items()}, peaks


def generate(umm, captions, static):
    def step():
        with ctx:  # on CUDA the frozen weights are bf16 and the LoRA float32: autocast makes them meet
            umm.generate_images(captions, cfg_scale=gen_cfg, temperature=1.0, static_cache=static,
                                generator=torch.Generator(device).manual_seed(seed))
    return step


def vq_work(umm, pixels):
    """The VQ model's work in one perturb_at='vq' UniGame step of train.py (mine='decode', refine_steps=0), alone:
    encode the batch (no grad); project and decode it, backward to the tokens (the perturber's pass; the VQ model is
    frozen, so no weight gradients); cand_k - 1 more decodes (mining's further candidates) and hard_bs decodes of
    codes (step 6's hard samples), without grad. Over the unigame_decode step's time: the VQ model's share of it."""
    hard = torch.arange(hard_bs) % len(pixels)  # as many hard samples as step 6 takes, drawn from this batch

    def step():
        with ctx:
            with torch.no_grad():
                tokens = umm.visual_tokens(pixels, "vq")
            tokens.requires_grad_(True)
            zq, codes = umm.project_to_codebook(tokens)
            torch.autograd.grad(umm.vq_decode(zq).float().sum(), tokens)
            with torch.no_grad():
                for _ in range(cand_k - 1):
                    umm.vq_decode(umm.project_to_codebook(tokens)[0])
                umm.decode_codes(codes[hard])
    return step


# ---- instead of the benchmarks: the loss check, and the GPU suite -------------------------------------

LOSSES = ("loss", "und", "hard", "adv_start")  # what train.py logs of each step's losses (loss_G is -lam * adv_start + R)


def loss_check():
    """train.py in bf16 autocast and, with compile, compiled (in float32, and in bf16: the GPU configuration) against
    eager float32 from the same seed, warmup + repeats steps of SFT and of the game: the largest relative difference of
    each logged loss over the steps, within its tolerance (check_tol, check_tol_game, check_tol_fp32); compiled, the
    graphs built by each step, none after the warm-up. LoRA dropout is off in these runs: compiled code draws its own
    random numbers, so its dropout masks would differ from eager's. Returns the exit code (1: a difference past its
    tolerance, a loss that is not finite, or a step after the warm-up that compiled)."""
    steps, path, report, failed = warmup + repeats, model_dir(), {}, []
    variants = {"bf16": dict(dtype="bfloat16", compile=False)}
    if compile:
        variants.update(compiled=dict(dtype="float32", compile=True), compiled_bf16=dict(dtype="bfloat16", compile=True))
    for name in ("sft", "unigame_decode"):
        # the game mines every other step, so that the hard samples' count, a shape of step 6, varies from step to step
        game = dict(mine_stride=2, q_hard=0.5) if name == "unigame_decode" else {}
        ref = train(name, path, steps, dtype="float32", compile=False, lora_dropout=0.0, **game)
        for variant, flags in variants.items():
            run = train(name, path, steps, lora_dropout=0.0, **game, **flags)
            r = report[f"{variant} {name}"] = {"max_rel_diff": {}, "tol": {}, "n_hard": [s.get("n_hard", 0) for s in run],
                                               "n_hard_float32": [s.get("n_hard", 0) for s in ref], "first_step_s": run[0]["ms"]["step"] / 1e3,
                                               "ms": statistics.median(s["ms"]["step"] for s in run[warmup:]),
                                               "ms_float32": statistics.median(s["ms"]["step"] for s in ref[warmup:])}
            for k in [k for k in LOSSES if any(k in s for s in ref)]:
                d = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(run, ref) if k in a and k in b]
                r["max_rel_diff"][k] = v = max(d) if all(map(math.isfinite, d)) else math.inf  # a NaN fails, as inf
                tol = r["tol"][k] = check_tol_fp32 if flags["dtype"] == "float32" else check_tol if k == "und" or name == "sft" else check_tol_game
                if not v <= tol:
                    failed.append(f"{variant} {name}: {k} differs by {100 * v:.3g} % (tolerance {100 * tol:g} %)")
            if flags["compile"]:  # train.py logs how many graphs the process has built after each step
                total = [s["graphs"] for s in run]
                r["graphs"], r["new_graphs_by_step"] = total[-1], [total[0]] + [b - a for a, b in zip(total, total[1:])]
                failed += [f"{variant} {name}: step {i + 1} built {n} new graph(s) after the {warmup} warm-up step(s)"
                           for i, n in enumerate(r["new_graphs_by_step"]) if i >= warmup and n]
    print(f"\nbench: loss check, {steps} train.py steps each against eager float32 (LoRA dropout off) | {device}, "
          f"torch {torch.__version__}, {threads or torch.get_num_threads()} threads")
    print(f"{'run':<29}{'largest relative difference (tolerance)':<68}{'step 1':>8}{'ms':>7}{'fp32 ms':>8}  graphs by step (1: since start-up)")
    for run, r in report.items():
        diffs = ", ".join(f"{k} {100 * v:.2g} % ({100 * r['tol'][k]:g})" for k, v in r["max_rel_diff"].items())
        print(f"{run:<29}{diffs:<68}{r['first_step_s']:>7.1f}s{r['ms']:>7.0f}{r['ms_float32']:>8.0f}  "
              f"{' '.join(map(str, r.get('new_graphs_by_step', ['-'])))}")
    print("\n".join(f"check failed: {f}" for f in failed) or "check passed")
    print(json.dumps({"check": "losses", "steps": steps, "device": device, "torch": torch.__version__,
                      "threads": threads or torch.get_num_threads(), "runs": report, "failed": failed}))
    return 1 if failed else 0


def run_part(cmd, deadline):
    """One part of the GPU suite: `cmd`, run here, its stdout passed on (to stderr) as it comes and kept, its stderr
    (progress bars, errors) passed through; its process group killed at `deadline` (time.time()). Returns (return
    code, None when stopped at the deadline; stdout), stdout unmixed with stderr, so that its last line is its own."""
    print(f"suite: {' '.join(cmd)}", file=sys.stderr, flush=True)
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, start_new_session=True)
    timer = threading.Timer(max(0.0, deadline - time.time()), lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    out = b""
    while chunk := p.stdout.read1(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        out += chunk
    p.wait()
    timer.cancel()
    stopped = p.returncode == -signal.SIGKILL and time.time() >= deadline
    return None if stopped else p.returncode, out.decode(errors="replace")


def gpu_suite_run():
    """Every CUDA-only part, one after the other, within suite_budget_s, then one table of the figures against the
    issue's targets (BENCHMARKS.md: the GPU path). A part that fails, or is still running when the budget is spent, is
    reported as such and the next one runs. Returns the exit code (1: a part did not complete)."""
    small, big = suite
    keep = {k: globals()[k] for k in ("device", "dtype", "compile", "threads", "seed", "lora_r", "cand_k", "allow_cpu", "warmup",
                                      "repeats", "cache_dir", "batch_size", "hard_bs", "gen_batch", "n_layer") if globals()[k] is not None}
    bench_cmd = [sys.executable, os.path.join(HERE, "bench.py")] + [f"--{k}={v}" for k, v in keep.items()]
    out = tempfile.mkdtemp(prefix="suite-")
    backend = "nccl" if device_type == "cuda" else "gloo"  # what train.py picks under torchrun
    parts = [  # (name, what it is, command)
        ("train", f"train.py, tiny base, {suite_steps} steps, torchrun 1 process ({backend}), compile={compile}, {dtype}",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", os.path.join(HERE, "train.py"),
          f"--out_dir={out}", f"--max_iters={suite_steps}", "--log_interval=1", "--eval_interval=0", "--ckpt_interval=0", "--eval_n=16",
          "--eval_adv_steps=0", f"--device={device}", f"--dtype={dtype}", f"--compile={compile}", f"--threads={threads}", f"--seed={seed}",
          f"--lora_r={lora_r}"] + [f"--{k}={keep[k]}" for k in ("batch_size", "hard_bs") if k in keep]),
        ("train_vq", f"{small}: sft, unigame_decode at 'vq', the VQ model's share", bench_cmd + [
            f"--preset={small}", "--benchmarks=sft,unigame_decode,vq", "--time_eager=False"]),
        ("train_aligner", f"{small}: unigame_decode at 'aligner'", bench_cmd + [
            f"--preset={small}", "--perturb_at=aligner", "--benchmarks=unigame_decode", "--time_eager=False"]),
        # eager: generate_dynamic is the eager dynamic cache; generate_static compiles its own decode step on CUDA
        ("generate", f"{small}: generation, dynamic cache eager, static cache + compiled decode step", bench_cmd + [
            f"--preset={small}", "--benchmarks=generate_dynamic,generate_static", "--compile=False"]),
        ("memory", f"{big}: unigame_decode, LoRA, its memory", bench_cmd + [
            f"--preset={big}", "--benchmarks=unigame_decode", "--time_eager=False", "--mfu=False"]),
    ]
    t0 = time.time()
    deadline, done = t0 + suite_budget_s, {}
    for name, what, cmd in [p for p in parts if p[0] in suite_parts.split(",")]:
        code, output = run_part(cmd, deadline) if time.time() < deadline else (None, "")
        if code is None:
            done[name] = {"what": what, "error": f"stopped: the suite's budget of {suite_budget_s} s was spent"}
        elif code != 0:
            done[name] = {"what": what, "error": f"failed (exit {code}; its errors are above)"}
        elif name == "train":
            done[name] = {"what": what, **train_figures(out)}
        else:  # bench.py's figures: its last line
            try:
                done[name] = {"what": what, **json.loads(output.strip().splitlines()[-1])}
            except (ValueError, IndexError):
                done[name] = {"what": what, "error": "its output ends without its figures"}
    shutil.rmtree(out, ignore_errors=True)
    rows = suite_rows(done)
    print(f"\nbench: the GPU suite in {time.time() - t0:.0f} s | {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device_type == 'cuda' else ''}, torch {torch.__version__}, {dtype}, compile={compile}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(json.dumps({"suite": done, "device": device if device_type == "cpu" else torch.cuda.get_device_name(device),
                      "torch": torch.__version__, "dtype": dtype, "compile": compile, "seconds": round(time.time() - t0, 1)}))
    return 1 if any("error" in v for v in done.values()) else 0


def train_figures(out):
    """The suite's train.py run, from its log: step time, compilation, graphs, loss."""
    steps = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "ms" in r]
    graphs = [s.get("graphs", 0) for s in steps]
    grew = [i + 1 for i in range(1, len(steps)) if graphs[i] > graphs[i - 1]]
    return {"steps": len(steps), "first_step_s": steps[0]["ms"]["step"] / 1e3,
            "ms": statistics.median(s["ms"]["step"] for s in steps[len(steps) // 2:]), "graphs": graphs[-1],
            "last_step_with_a_new_graph": grew[-1] if grew else 1, "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "mem_gb": max(s.get("mem_gb", 0) for s in steps)}


def suite_rows(done):
    """The suite's table: (part, figures, target, met) for each part, with the issue's targets (judged on CUDA only:
    a CPU dry run's figures say nothing of them)."""
    def met(*oks):
        oks = [ok for ok in oks if ok is not None]
        return "-" if not oks or device_type != "cuda" else "yes" if all(oks) else "NO"

    def res(name, bench):
        return done.get(name, {}).get("results", {}).get(bench, {})

    rows = [("part", "figures", "target", "met")]
    for name, part in done.items():
        label = f"{name}: {part['what']}"
        if "error" in part:
            rows.append((label, part["error"], "", "NO"))
        elif name == "train":
            late = part["last_step_with_a_new_graph"] <= part["steps"] // 2  # judged anywhere: compiling is the same
            rows.append((label, f"{part['ms']:.1f} ms a step (median, 2nd half), first step {part['first_step_s']:.1f} s, {part['graphs']} "
                                f"graphs (last new at step {part['last_step_with_a_new_graph']}), loss {part['loss_first']:.3f} -> "
                                f"{part['loss_last']:.3f}" + (f", {part['mem_gb']:.1f} GB held" if part["mem_gb"] else ""),
                         "runs; no new graph in the 2nd half", "yes" if late else "NO"))
        elif name in ("train_vq", "train_aligner"):
            for bench, floor in (("sft", 0.35), ("unigame_decode", 0.30)):
                r = res(name, bench)
                if r:
                    ratio = r["ms"] / res("train_vq", "sft")["ms"] if res("train_vq", "sft") and bench != "sft" else None
                    share = part["ratios"].get("vq_share_of_unigame_decode") if bench != "sft" else None
                    rows.append((f"{label} [{bench}]", f"{r['ms']:.1f} ms, {r['samples_per_s']:.1f} samples/s"
                                 + (f", MFU {100 * r['mfu']:.1f} %" if "mfu" in r else ", MFU not counted")
                                 + (f", {ratio:.2f}x sft" if ratio else "") + (f", VQ model {100 * share:.0f} % of it" if share else "")
                                 + (f", {r['peak_reserved_gb']:.1f} GB held" if "peak_reserved_gb" in r else ""),
                                 f"MFU >= {100 * floor:.0f} %" + ("; <= 2.5x sft" if ratio else ""),
                                 met(r["mfu"] >= floor if "mfu" in r else None, ratio <= 2.5 if ratio else None)))
        elif name == "generate":
            d, s = res(name, "generate_dynamic"), res(name, "generate_static")
            x = d["ms"] / s["ms"]
            rows.append((label, f"dynamic {d['tokens_per_s']:.0f} tokens/s, static {s['tokens_per_s']:.0f} tokens/s: {x:.2f}x",
                         "static >= 3x dynamic", met(x >= 3)))
        elif name == "memory":
            r = res(name, "unigame_decode")
            held = r.get("peak_reserved_gb")
            rows.append((label, f"batch {r['batch']}, gradient checkpointing {'on' if part['gradient_checkpointing'] else 'off'}, {r['ms']:.1f} ms"
                         + (f", {held:.1f} GB held (max_memory_reserved)" if held else ""),
                         "< 80 GB held", met(None if held is None else held < 80)))
    return rows


# ---- running them -------------------------------------------------------------------------------

if check_losses:
    raise SystemExit(loss_check())
if gpu_suite:
    raise SystemExit(gpu_suite_run())

path = model_dir()
print(f"bench: {preset} ({path}) | perturb_at={perturb_at}, batch {B}, hard_bs {hard_bs}, cand_k {cand_k}, "
      f"LoRA r={lora_r}{', gradient checkpointing' if checkpointing else ''} | {device}"
      f"{' ' + torch.cuda.get_device_name(device) if device_type == 'cuda' else ''}, torch {torch.__version__}, "
      f"{threads or torch.get_num_threads()} threads | train.py runs: warm-up {warmup}, median of {repeats}", flush=True)
peak = peak_flops()
eager, timed, flops = {}, {}, {}  # eager: with compile and time_eager, the same benchmark eager (the speed-up)
for name in [n for n in TRAINING if n in chosen]:
    if compile and time_eager:
        eager[name] = time_training(name, path, compiled=False)
    timed[name] = time_training(name, path, compiled=compile)
    if peak and mfu and name in ("sft", "sft_hard", "sft_2x", "unigame_decode"):
        flops[name] = count_flops(name, path)

# the generation benchmarks, and what the report says of the model: the model as train.py trains it (LoRA added)
umm = UMM.from_pretrained(path, dtype=getattr(torch, weights)).to(device)
lora = umm.set_trainable([], lora_r)
# the train.py runs read prefixes of the same samples (train_n = batch * steps): the longest of these
records = data.shapes_world("train", max(max(map(batch_of, TRAINING)) * (max(warmup, 2) + repeats), gen_B), seed=0)
seq_len = max(len(umm.prompt_ids(r["question"])) + len(umm.answer_ids(r["answers"][0])) for r in records)
n_params = sum(p.numel() for p in umm.parameters())
here = {name: generate(umm, [r["caption"] for r in records[:gen_B]], name == "generate_static")
        for name in ("generate_dynamic", "generate_static") if name in chosen}
if "vq" in chosen:
    here["vq"] = vq_work(umm, umm.preprocess([r["image"] for r in records[:B]]))
peaks = {}
if here:
    print(f"bench: {', '.join(here)}: {warmup} + {repeats} calls", flush=True)
    if compile and time_eager:
        here_eager, peaks = measure(here, warmup, repeats)
    if compile:  # the modules train.py compiles; generate_images compiles its own decode step (static cache, CUDA)
        umm.compile_towers()
    here_timed, peaks = measure(here, max(warmup, 2) if compile else warmup, repeats)
    for name in here:  # as train.py's phases: milliseconds
        timed[name] = {"ms": {"step": 1e3 * here_timed[name][0]}, "cpu_ms": {"step": 1e3 * here_timed[name][1]}}
        if compile and time_eager:
            eager[name] = {"ms": {"step": 1e3 * here_eager[name][0]}, "cpu_ms": {"step": 1e3 * here_eager[name][1]}}

# ---- report -------------------------------------------------------------------------------------


def ratios_of(key):
    """The issue's ratios, from wall (key='ms') or CPU (key='cpu_ms') times."""
    t = {name: v[key]["step"] for name, v in timed.items()}
    mine = {name: v[key]["mine"] for name, v in timed.items() if "mine" in v[key]}
    out = {}
    for other in ("sft", "sft_hard", "sft_2x"):
        if other in t and "unigame_decode" in t:
            out[f"unigame_decode_over_{other}"] = t["unigame_decode"] / t[other]
    if "sft" in t and "unigame_generate" in t:
        out["unigame_generate_over_sft"] = t["unigame_generate"] / t["sft"]
    if len(mine) == 2:  # one mined candidate: the mining phase over the B * cand_k candidates it scores
        out["ms_per_candidate_decode"] = mine["unigame_decode"] / (B * cand_k)
        out["ms_per_candidate_generate"] = mine["unigame_generate"] / (B * cand_k)
        out["generate_over_decode_per_candidate"] = mine["unigame_generate"] / mine["unigame_decode"]
    if "generate_dynamic" in t and "generate_static" in t:
        out["static_over_dynamic_speedup"] = t["generate_dynamic"] / t["generate_static"]
    if "vq" in t and "unigame_decode" in t and perturb_at == "vq":  # the VQ model's work in a UniGame step, timed alone
        out["vq_share_of_unigame_decode"] = t["vq"] / t["unigame_decode"]
    return out


tokens_per_image = umm.num_image_tokens
results = {}
for name in [n for n in ALL if n in timed]:
    ms, n = timed[name]["ms"]["step"], batch_of(name)
    r = {"batch": n, "ms": ms, "samples_per_s": 1e3 * n / ms}
    if cpu:
        r["cpu_ms"] = timed[name]["cpu_ms"]["step"]
    if name.startswith("generate"):
        r["tokens_per_s"] = 1e3 * n * tokens_per_image / ms
    if name in peaks:
        r["peak_mem_gb"], r["peak_reserved_gb"] = peaks[name]
    elif timed[name].get("mem_gb"):  # train.py's: torch.cuda.max_memory_reserved over its run
        r["peak_reserved_gb"] = timed[name]["mem_gb"]
    if flops.get(name):
        r["tflops"] = flops[name] / 1e12
        r["mfu"] = flops[name] / (ms / 1e3) / peak
    if name in eager:
        r["eager_ms"] = eager[name]["ms"]["step"]
        r["compile_speedup"] = r["eager_ms"] / ms
    if name in TRAINING:  # train.py's phases, without their sum ("step": ms above)
        r["phases_ms"] = {k: v for k, v in timed[name]["ms"].items() if k != "step"}
        if cpu:
            r["phases_cpu_ms"] = {k: v for k, v in timed[name]["cpu_ms"].items() if k != "step"}
    if name.startswith("unigame"):
        r["hard_per_step"] = timed[name]["hard"]
    results[name] = r
ratios = ratios_of("ms")
ratios_cpu_time = ratios_of("cpu_ms") if cpu else {}
# the largest resident set of this process and of any train.py run (KiB on Linux)
peak_rss_gb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2 ** 20

print(f"\nbench: {n_params / 1e6:.1f}M parameters, {sum(p.numel() for p in lora.values()) / 1e6:.2f}M trained | longest "
      f"understanding sequence {seq_len} tokens, {tokens_per_image} image tokens")
head = f"{'benchmark':<18}{'batch':>6}{'ms':>10}" + (f"{'cpu ms':>10}" if cpu else "") + f"{'samples/s':>11}{'tokens/s':>10}"
if not cpu:
    head += f"{'held GB':>9}{'MFU':>7}"
if eager:
    head += f"{'eager ms':>10}{'compile x':>10}"
print(head)
for name, r in results.items():
    line = f"{name:<18}{r['batch']:>6}{r['ms']:>10.1f}" + (f"{r['cpu_ms']:>10.1f}" if cpu else "")
    line += f"{r['samples_per_s']:>11.2f}" + (f"{r['tokens_per_s']:>10.0f}" if "tokens_per_s" in r else f"{'-':>10}")
    if not cpu:
        line += f"{r.get('peak_reserved_gb', float('nan')):>9.2f}" + (f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'-':>7}")
    if eager:
        line += f"{r['eager_ms']:>10.1f}{r['compile_speedup']:>9.2f}x" if name in eager else f"{'-':>10}{'-':>10}"
    print(line)
for name, r in results.items():
    for key in ("phases_ms", "phases_cpu_ms"):
        if key in r:
            print(f"  {name} {key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items()))
    if "hard_per_step" in r:
        print(f"  {name} hard samples a step: {r['hard_per_step']:g} (hard_bs {hard_bs})")
for k in ratios:
    print(f"  {k}: {ratios[k]:.2f}" + (f"  (CPU time: {ratios_cpu_time[k]:.2f})" if cpu else ""))
if cpu:
    print(f"  peak memory (process RSS, the largest of bench and its train.py runs): {peak_rss_gb:.2f} GB")
print(json.dumps({"preset": preset, "model": path, "device": device if cpu else torch.cuda.get_device_name(device),
                  "torch": torch.__version__, "threads": threads or torch.get_num_threads(), "perturb_at": perturb_at,
                  "batch_size": B, "hard_bs": hard_bs, "cand_k": cand_k, "mine_cfg": mine_cfg, "seq_len": seq_len,
                  "image_tokens": tokens_per_image, "params_m": n_params / 1e6, "gradient_checkpointing": checkpointing,
                  "compile": compile, "time_eager": time_eager, "dtype": dtype, "warmup": warmup, "repeats": repeats,
                  "peak_rss_gb": peak_rss_gb, "results": results, "ratios": ratios, "ratios_cpu_time": ratios_cpu_time}))
