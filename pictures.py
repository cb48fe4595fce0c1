"""
Pictures of the game, to look at rather than read: the adversary's images beside the clean image, its
VQ reconstruction, a PGD image and a random δ's image of the same budget, and the image generated from
the caption, with the model's answer under each; the hard buffer's items decoded from their codes; a
run's curves from its log.jsonl; the hardness distribution of its mining log; eval.py --compare as bars.

    python eval.py --ckpt=out/x --show=out/show-x       # samples.png, and buffer.png for a training out_dir
    python eval.py --curves=out/x --show=out/show-x     # curves.png, and hardness.png if it ran with --mine_log=True
    python eval.py --compare "out/sft-s*" "out/x-s*" --bars=bars.png

The grids need only pillow. The curves and bars are drawn with matplotlib, an optional dependency,
imported only when they are asked for (pip install matplotlib).
"""

import glob
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import eval as ev
from data import read_attrs, oracle_score, shapes_world
from perturber import random_like

# ---- the grids' layout, in pixels: every picture drawn IMG square (the world's 32x32 at 4x, nearest neighbour) ----
IMG, PAD, LINE = 128, 8, 13
TITLE, HEADING = 22, 18
TOP, FOOT = TITLE + HEADING, 2 * LINE + 8  # above the first row; below the last, two lines saying how to read the grid
CELL_W, CELL_LINES = IMG + 2 * PAD, 5  # samples.png: one picture, then question (2 lines), label, answer, note
CELL_H = 2 * PAD + IMG + 4 + CELL_LINES * LINE
ITEM_W, ITEM_LINES, ITEMS_PER_ROW = 2 * IMG + 3 * PAD, 6, 4  # buffer.png: the source image and the item, side by side
ITEM_H = 2 * PAD + IMG + 4 + ITEM_LINES * LINE
GREEN, RED, GREY, BLACK = (20, 130, 40), (200, 30, 30), (120, 120, 120), (0, 0, 0)
DPI = 80  # the plots: figure inches x 80 = pixels
CURVES_IN, HARDNESS_IN, BARS_IN = (12, 6.4), (12, 3.6), (12, 4.5)


def _font(size=11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


FONT, TITLE_FONT = _font(11), _font(13)


def _picture(image):
    """A uint8 (3, H, W) tensor as a PIL image IMG square: nearest neighbour up, so pixels stay pixels."""
    im = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    return im.resize((IMG, IMG), Image.NEAREST if max(im.size) <= IMG else Image.BICUBIC)


def _fit(draw, text, width, lines=1):
    """text broken at spaces into at most `lines` lines of at most `width` pixels; the last cut with '...'."""
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=FONT) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words or (out and draw.textlength(out[-1], font=FONT) > width):
        last = out[-1] + " " + " ".join(words) if words else out[-1]
        while last and draw.textlength(last + "...", font=FONT) > width:
            last = last[:-1]
        out[-1] = last.rstrip() + "..."
    return out + [""] * (lines - len(out))


def _cell(canvas, draw, x, y, images, lines, frame=None):
    """Pictures side by side at (x, y) (None: an empty grey square), framed in `frame`, and (text, colour)
    lines under them."""
    for j, image in enumerate(images):
        px, py = x + PAD + j * (IMG + PAD), y + PAD
        if frame:
            draw.rectangle([px - 3, py - 3, px + IMG + 2, py + IMG + 2], fill=frame)
        if image is None:
            draw.rectangle([px, py, px + IMG - 1, py + IMG - 1], fill=(225, 225, 225))
        else:
            canvas.paste(_picture(image), (px, py))
    for k, (text, colour) in enumerate(lines):
        draw.text((x + PAD, y + PAD + IMG + 4 + k * LINE), text, fill=colour, font=FONT)


def _footer(draw, W, H, text):
    for k, line in enumerate(_fit(draw, text, W - 2 * PAD, 2)):
        draw.text((PAD, H - FOOT + 2 + k * LINE), line, fill=GREY, font=FONT)


def _verdict(score):
    return ("right", GREEN) if score >= 1 else ("wrong", RED) if score <= 0 else (f"partly, {score:.2f}", GREY)


# ---- samples.png: one row per sample, one column per view of it ------------------------------------

def sample_views(umm, records, perturber=None, own_at="vq", at="vq", eps=0.3, relative=True, steps=5, step_size=None,
                 cfg_scale=1.0, temperature=0.0, seed=0):
    """The columns of samples.png, [(heading, [view per record])], each view {"image": uint8 (3, S, S) or None,
    "answer": the model's greedy answer, "note": str}: the clean image as the model sees it, its VQ reconstruction,
    the perturber's image (at its learned ε), a PGD image and a random δ's image (budget eps at `at`, as eval.py
    attacks), and the image generated from the caption, asked the same question."""
    g = torch.Generator(device=umm.device).manual_seed(seed)
    questions, labels = [r["question"] for r in records], [ev.label(r) for r in records]
    px = ev._pixels(umm, records)

    def oracle(images):  # whether the oracle reads the record's scene in each picture (world samples only)
        return ["" if im is None or not r.get("attrs") else "scene ok" if oracle_score(im, r["attrs"]) else "scene off"
                for im, r in zip(images, records)]

    def views(emb, pixels=None, changed=None, note=""):
        with torch.no_grad():
            answers = umm.answer(emb, questions)
        images = [None] * len(records) if pixels is None else list(umm.to_uint8(pixels))
        notes = oracle(images) if pixels is not None else [note] * len(records)
        if changed is not None:
            notes = [f"{c:.0%} codes · {n}".rstrip(" ·") for c, n in zip(changed.tolist(), notes)]
        return [{"image": im, "answer": a, "note": n} for im, a, n in zip(images, answers, notes)]

    def perturbed(tokens, delta, where, count=True):  # count: note the share of codes the perturbation changed
        with torch.no_grad():
            emb, pixels, codes = umm.perturbed_view(tokens + delta, where)
            changed = umm.codes_changed(tokens, codes) if where == "vq" and count else None
        return views(emb, pixels, changed, note="" if where == "vq" else "delta at the aligner: no picture")

    with torch.no_grad():
        columns = [("clean", views(umm.image_embeds(px), px)),
                   ("VQ reconstruction", perturbed(umm.visual_tokens(px, "vq"), 0.0, "vq", count=False))]
        if perturber is not None:
            tokens = umm.visual_tokens(px, own_at)
            delta = ev.perturber_delta(umm, perturber, own_at, seed)(tokens, questions, labels)  # seeing what it saw in training
            columns.append((f"its perturber, eps {perturber.eps.item():.3g}", perturbed(tokens, delta, own_at)))
        else:
            columns.append(("its perturber", [{"image": None, "answer": None, "note": "none in this checkpoint"} for _ in records]))
        tokens = umm.visual_tokens(px, at)
    delta = ev.pgd_delta(umm, tokens, questions, labels, at, eps, relative, steps, step_size, g)
    columns.append((f"PGD, {steps} steps, eps {eps:g}", perturbed(tokens, delta.detach(), at)))
    columns.append((f"random delta, eps {eps:g}", perturbed(tokens, random_like(tokens, eps, relative, generator=g), at)))
    with torch.no_grad():
        if all(r.get("caption") for r in records):
            codes = umm.generate_images([r["caption"] for r in records], cfg_scale=cfg_scale, temperature=temperature, generator=g)
            pixels = umm.decode_codes(codes).clamp(-1, 1)  # seen as any picture is: as uint8, preprocessed (eval.py's consistency)
            columns.append(("image of the caption", views(umm.image_embeds(umm.preprocess(umm.to_uint8(pixels))), pixels)))
        else:
            columns.append(("image of the caption", [{"image": None, "answer": None, "note": "no caption"} for _ in records]))
    return columns


def draw_samples(columns, records, path, title=""):
    """samples.png: a row per record, a column per view; under each picture the question, the label and the
    model's answer, right (green) or wrong (red), and a note (codes changed, whether the oracle reads the scene)."""
    W, H = len(columns) * CELL_W, TOP + len(records) * CELL_H + FOOT
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), _fit(draw, title, W - 2 * PAD)[0], fill=BLACK, font=TITLE_FONT)
    for j, (heading, views) in enumerate(columns):
        x = j * CELL_W
        draw.text((x + PAD, TITLE), _fit(draw, heading, CELL_W - PAD)[0], fill=BLACK, font=FONT)
        for i, (v, r) in enumerate(zip(views, records)):
            lines = [(t, BLACK) for t in _fit(draw, r["question"], IMG + PAD, 2)] + [(f"label: {ev.label(r)}", BLACK)]
            frame = None
            if v["answer"] is not None:
                word, frame = _verdict(ev.answer_score(v["answer"], r["answers"], vqa=r.get("attrs") is None))
                lines.append((_fit(draw, f"answer: {v['answer']} ({word})", IMG + PAD)[0], frame))
            else:
                lines.append(("", BLACK))
            lines.append((_fit(draw, v["note"], IMG + PAD)[0], GREY))
            _cell(canvas, draw, x, TOP + i * CELL_H, [v["image"]], lines, frame)
    _footer(draw, W, H, "frame: the model's answer right (green) or wrong (red); codes: the share of image tokens "
              "whose code the perturbation changed; scene ok / off: the oracle reads the sample's objects in the picture, or not")
    canvas.save(path, optimize=True)
    return path


# ---- buffer.png: the hard buffer's items, hardest first ----------------------------------------------

def _world_sources(items):
    """The source record of each item from the built-in world ("shapes/{split}/{i}", re-drawn with the world
    seed train.py uses, 0, and checked by its question), else None."""
    where = [it["source"].split("/") if str(it.get("source", "")).startswith("shapes/") else None for it in items]
    wanted = {}
    for w in filter(None, where):
        wanted[w[1]] = max(wanted.get(w[1], 0), int(w[2]) + 1)
    drawn = {split: shapes_world(split, n, seed=0) for split, n in wanted.items()}
    out = [drawn[w[1]][int(w[2])] if w else None for w in where]
    return [r if r is not None and r["question"] == it["question"] else None for r, it in zip(out, items)]


@torch.no_grad()
def buffer_views(umm, items, H):
    """What buffer.png shows of each item: its source image (re-drawn), the item as a picture (decoded from its
    codes; None for an 'aligner' item, an image plus a δ in LM space), the model's answer to its question, the
    oracle's reading of the picture, and H, CE and s: CE and s as train.py stored them at mining, or, for items
    of a run that did not store them, computed now with this model (s: the built-in score, against the source)."""
    sources = _world_sources(items)
    emb = umm.buffered_embeds(items)
    answers = umm.answer(emb, [it["question"] for it in items])
    ce_now = umm.answer_loss(emb, [it["question"] for it in items], [it["answer"] for it in items])
    out = []
    for j, (it, src, a) in enumerate(zip(items, sources, answers)):
        picture = umm.to_uint8(umm.decode_codes(it["codes"][None].to(umm.device)))[0] if "codes" in it else None
        reading = ev.answer_from_attrs(it["question"], read_attrs(picture)) if picture is not None and src else None
        ce, s, when = it.get("ce"), it.get("s"), "at mining"
        if ce is None:
            ce, when = ce_now[j].item(), "now"
            s = F.cosine_similarity(emb[j].mean(0), umm.image_embeds(umm.preprocess([src["image"]]))[0].mean(0), dim=0).item() if src else None
        out.append({"source": src["image"] if src else None, "picture": picture, "answer": a, "reading": reading,
                    "H": float(H[j]), "ce": ce, "s": s, "when": when})
    return out


def draw_buffer(views, items, path, title=""):
    """buffer.png: ITEMS_PER_ROW items a row, each the source image beside the item decoded from its codes, with
    its question, label, the oracle's reading of the picture (does the label hold?), the model's answer, H, CE, s."""
    rows = max(1, -(-len(items) // ITEMS_PER_ROW))
    W, H = ITEMS_PER_ROW * ITEM_W, TOP + rows * ITEM_H + FOOT
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), _fit(draw, title, W - 2 * PAD)[0], fill=BLACK, font=TITLE_FONT)
    for j in range(min(len(items), ITEMS_PER_ROW)):
        draw.text((j * ITEM_W + PAD, TITLE), "source | the item, decoded", fill=BLACK, font=FONT)
    width = ITEM_W - 2 * PAD
    for n, (v, it) in enumerate(zip(views, items)):
        if v["reading"] is None:
            oracle = ("oracle: no picture or no source" if v["picture"] is None or v["source"] is None else "oracle: names no single object", GREY)
        else:
            holds = v["reading"] == it["answer"]
            oracle = (f"oracle reads: {v['reading']} (label {'holds' if holds else 'lost'})", GREEN if holds else RED)
        word, colour = _verdict(float(v["answer"] == it["answer"]))
        s = "-" if v["s"] is None else f"{v['s']:.3f}"
        lines = [(_fit(draw, it["question"], width)[0], BLACK), (f"label: {it['answer']}", BLACK), oracle,
                 (_fit(draw, f"model: {v['answer']} ({word})", width)[0], colour),
                 (f"H {v['H']:.3f}   CE {v['ce']:.3f}   s {s}", BLACK),
                 (_fit(draw, f"CE, s {v['when']} · {it.get('source', '')}", width)[0], GREY)]
        _cell(canvas, draw, (n % ITEMS_PER_ROW) * ITEM_W, TOP + (n // ITEMS_PER_ROW) * ITEM_H, [v["source"], v["picture"]], lines)
    _footer(draw, W, H, "left: the source sample, re-drawn; right: the item as the understanding branch trains on it; "
              "oracle reads: the item's question answered from what the oracle reads in it; model: this checkpoint's answer; "
              "H, CE, s: at mining (stored by train.py) or, for older runs, CE and the built-in s now")
    canvas.save(path, optimize=True)
    return path


def show(umm, ckpt, records, folder, perturber=None, own_at="vq", at="vq", eps=0.3, relative=True, steps=5, step_size=None,
         cfg_scale=1.0, temperature=0.0, seed=0, n_items=8):
    """eval.py --show: samples.png for `records`; for a training checkpoint also buffer.png, its hard buffer's
    n_items hardest items. Returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    columns = sample_views(umm, records, perturber, own_at, at, eps, relative, steps, step_size, cfg_scale, temperature, seed)
    budget = f"PGD and random delta at '{at}', eps {eps:g} {'of each token norm' if relative else 'absolute'}"
    paths = [draw_samples(columns, records, os.path.join(folder, "samples.png"), f"{ckpt}: {len(records)} test samples; {budget}")]
    _, meta, ckpt_dir = ev.locate(ckpt)
    if ckpt_dir is not None:
        items, H = ev.read_buffer(ckpt_dir)
        items, H = items[:n_items], H[:n_items]
        title = (f"{ckpt_dir}, step {meta.get('iter_num')}: the hard buffer's {len(items)} hardest items"
                 + ("" if items else ": the buffer is empty"))
        paths.append(draw_buffer(buffer_views(umm, items, H) if items else [], items, os.path.join(folder, "buffer.png"), title))
    return paths


# ---- the mining log: every candidate of every mining round -------------------------------------------

def _jsonl(path):
    """The records of a JSONL file; a line torn by a kill is skipped."""
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def read_mine_log(run):
    """Every candidate of a run's mining logs (out_dir/mining{rank}.jsonl), each with its "rank"."""
    folder = run if os.path.isdir(run) else os.path.dirname(run)
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "mining*.jsonl"))):
        rank = os.path.basename(path)[len("mining"):-len(".jsonl")]
        out += [{**r, "rank": int(rank) if rank.isdigit() else 0} for r in _jsonl(path)]
    return out


def hardness_histogram(candidates, key="H", bins=30):
    """(bin edges, counts of all candidates, counts of the kept ones) of `key` ("H", "ce" or "s"), on shared edges."""
    values = np.array([c[key] for c in candidates], dtype=float)
    kept = np.array([c[key] for c in candidates if c["kept"]], dtype=float)
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else np.linspace(0, 1, bins + 1)
    return edges, np.histogram(values, edges)[0], np.histogram(kept, edges)[0]


# ---- plots (matplotlib) -------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, drawing to files; a missing matplotlib stops with the line that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib, an optional dependency: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(ax, steps, key, label, **style):
    xs = [r["iter"] for r in steps if isinstance(r.get(key), (int, float))]
    if xs:
        ax.plot(xs, [r[key] for r in steps if isinstance(r.get(key), (int, float))], label=label, **style)
    return bool(xs)


def _panel(ax, title, drawn):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    if not drawn:
        ax.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def draw_curves(log_path, path):
    """curves.png: a run's log.jsonl, per step: the answer CE of the clean batch and of the adversary's images of
    the same batch; the hard samples' CE; ε; the buffer's size and the candidates kept; the share of codes the
    perturbation changed; and the evaluation points (with the before / after summary). Steps whose update was
    skipped (non-finite values) are marked in red."""
    plt = pyplot()
    records = _jsonl(log_path)
    steps = [r for r in records if "loss" in r]
    if not steps:
        raise SystemExit(f"--curves: {log_path} has no logged training steps")
    fig, axes = plt.subplots(2, 3, figsize=CURVES_IN, dpi=DPI)
    (ce, hard, eps), (buf, changed, evals) = axes
    drawn = _series(ce, steps, "und", "clean") | _series(ce, steps, "adv", "adversary's images")
    if any(r.get("adv_start") != r.get("adv") for r in steps if "adv_start" in r):  # an aim step refined the perturber's delta
        _series(ce, steps, "adv_start", "before the aim step", linestyle=":")
    _panel(ce, "answer CE on the same batch", drawn)
    _panel(hard, "hard samples' CE (trained on)", _series(hard, steps, "hard", "hard samples") | _series(hard, steps, "und", "clean", alpha=0.4))
    _panel(eps, "ε (budget, of each token norm or absolute)", _series(eps, steps, "eps", "ε"))
    _panel(buf, "hard buffer", _series(buf, steps, "buffer", "size after mining") | _series(buf, steps, "kept", "kept this step"))
    _panel(changed, "share of codes the perturbation changed", _series(changed, steps, "changed", "changed"))
    points = {}
    for r in records:
        if "eval" in r:
            for k, v in r["eval"].items():
                points.setdefault(k, []).append((r["iter"], v))
        if "summary" in r:
            for when, x in (("before", 0), ("after", r["iter"])):
                for k, v in (r["summary"].get(when) or {}).items():
                    points.setdefault(f"{k} (summary)", []).append((x, v))
    for k, pts in points.items():
        evals.plot(*zip(*pts), marker="o", label=k, linestyle="-" if "summary" not in k else "--")
    _panel(evals, "evaluation", bool(points))
    for r in records:
        if "skipped_update" in r:
            for ax in axes.flat:
                ax.axvline(r["iter"], color="red", alpha=0.3)
    fig.suptitle(f"{log_path}: {len(steps)} logged steps, last {steps[-1]['iter']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_hardness(candidates, path, tau=None, q_hard=None, title=""):
    """hardness.png: histograms of H, CE and s over every mined candidate, and over those kept in the buffer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=HARDNESS_IN, dpi=DPI)
    for ax, key, name in zip(axes, ("H", "ce", "s"), ("hardness H", "answer CE", "consistency s")):
        edges, every, kept = hardness_histogram(candidates, key)
        ax.stairs(every, edges, label=f"all {every.sum()}", fill=True, alpha=0.35)
        ax.stairs(kept, edges, label=f"kept {kept.sum()}", color="C3", linewidth=1.5)
        if key == "s" and tau is not None:
            ax.axvline(tau, color="black", linestyle="--", label=f"τ {tau:g}")
        ax.set_yscale("log", nonpositive="clip")  # most candidates are easy: the tail is what is kept
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("candidates", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title + (f" (kept: H ≥ the batch's {q_hard:g} quantile)" if q_hard is not None else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def curves(run, folder):
    """eval.py --curves: curves.png from a run's log.jsonl (run: its out_dir or the file), and hardness.png when
    the run kept a mining log (train.py --mine_log=True). Returns the paths written."""
    log_path = os.path.join(run, "log.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(log_path):
        raise SystemExit(f"--curves={run}: no log.jsonl there")
    pyplot()  # a missing matplotlib is reported before anything is read
    os.makedirs(folder, exist_ok=True)
    paths = [draw_curves(log_path, os.path.join(folder, "curves.png"))]
    candidates = read_mine_log(log_path)
    if candidates:
        cfg = ev.locate(os.path.dirname(log_path))[1].get("config", {})
        steps = len({(c["iter"], c["rank"]) for c in candidates})
        paths.append(draw_hardness(candidates, os.path.join(folder, "hardness.png"), cfg.get("tau"), cfg.get("q_hard"),
                                   f"{len(candidates)} mined candidates over {steps} mining rounds"))
    return paths


def draw_bars(groups, path):
    """eval.py --compare's table as bars: every figure that is a fraction (understanding, robustness, ...), one bar
    per group of runs at their mean, ± their sample standard deviation, and each run (seed) as a dot."""
    plt = pyplot()
    keys = []
    for _, runs in groups:
        for r in runs:
            keys += [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys
                     and not k.startswith("train_")]
    keys = [k for k in keys if all(0 <= r[k] <= 1 for _, runs in groups for r in runs if isinstance(r.get(k), (int, float)))]
    if not keys:
        raise SystemExit("--bars: no figure in [0, 1] to draw")
    fig, ax = plt.subplots(figsize=BARS_IN, dpi=DPI)
    width = 0.8 / len(groups)
    for j, (pattern, runs) in enumerate(groups):
        for i, k in enumerate(keys):
            vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
            if not vals:
                continue
            x, m = i + (j - (len(groups) - 1) / 2) * width, sum(vals) / len(vals)
            sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            ax.bar(x, m, width, yerr=sd, color=f"C{j}", capsize=2, label=os.path.basename(pattern.rstrip("/")) if i == 0 else None)
            ax.plot([x] * len(vals), vals, "k.", markersize=3)
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n", 1) for k in keys], fontsize=7)
    ax.set_ylabel("fraction (mean ± sd; dots: runs)", fontsize=8)
    ax.legend(fontsize=7, ncol=len(groups))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
