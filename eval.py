"""
Evaluation of a UniGame / base checkpoint on the paper's four axes: understanding, generation,
consistency, robustness (ood split, and a fresh PGD attack at the game's interface).

    python eval.py --ckpt=assets/shapes-base --out_dir=out/eval-base
    python eval.py --ckpt=out/unigame --data=vqav2 --vqav2_questions=... --vqav2_annotations=... --vqav2_images=...
    python eval.py --compare out/eval-sft out/eval-unigame              # side by side, deltas vs the first
    python eval.py --compare "out/eval-sft-s*" "out/eval-unigame-s*"    # each glob's runs averaged: mean ± std
    python eval.py --compare "out/sft-s*" "out/pgd-s*" --plot=cost.png   # and robustness_adv against training CPU s/step
    python eval.py --buffer=out/unigame                                 # label-preservation rate of its hard buffer
    python eval.py --ckpt=out/unigame --show=out/show                    # pictures: samples.png, buffer.png (pictures.py)
    python eval.py --curves=out/unigame --show=out/show                  # curves.png (+ hardness.png with --mine_log=True)
    python eval.py --compare "out/sft-s*" "out/unigame-s*" --bars=bars.png  # the table as bars, with the seeds' spread

--ckpt is a Hugging Face directory (assets/shapes-base, an export), a training checkpoint (out/x/ckpt,
whose model/ is used) or a training out_dir (out/x). Writes out_dir/eval.json and prints a table.
Figures are fractions in [0, 1]; settings, attack budget and skipped axes are recorded beside them.
"""

import glob
import json
import math
import os
import re
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

import checkpoint
from data import (BadData, caption_qa, describe_skips, load_image, load_jsonl, load_vqav2, oracle_score, read_attrs, readable,
                  shapes_world)
from data import skipped as bad_samples  # what the loaders and readable skipped (skip_bad)
from perturber import Perturber, parse_sees, pgd_attack, random_like

# -----------------------------------------------------------------------------------------------
ckpt = "assets/shapes-base"
out_dir = "out/eval"
data = "shapes"  # 'shapes' (the built-in world) | 'vqav2' | 'jsonl'
vqav2_questions = ""  # path to v2_OpenEnded_mscoco_val2014_questions.json
vqav2_annotations = ""  # path to v2_mscoco_val2014_annotations.json
vqav2_images = ""  # folder of COCO val2014 images
jsonl_path = ""  # a JSONL manifest: {"image", "question", "answers", "caption"?}
skip_bad = False  # skip (count and report) unreadable samples instead of stopping
vqa_convention = "vqaeval"  # VQA accuracy's answer processing: 'vqaeval' (the official script) | 'lmms_eval' | 'normalize_both'
prompt_suffix = None  # after every question on a line of its own (e.g. "Answer the question using a single word or phrase.");
#                      None: as the checkpoint was trained (its ckpt.json), else none
answer_tokens = 16  # most tokens of a generated answer (VQAv2's answers fit in 16)
n = 1000  # test (and ood) samples for understanding
gen_n = 200  # test captions for generation and consistency
adv_n = 256  # test samples attacked with PGD (each costs adv_steps forward+backward passes)
batch_size = 64
cfg_scale = 1.0  # classifier-free guidance for generation (1: none); the shipped base was trained with 10%
#                 unconditional prompts (gen_uncond_p), so guidance has an unconditional branch to work with
temperature = 0.0  # 0: greedy image tokens
# the attack budget, for PGD and the random perturbation; None: as the checkpoint was trained (its
# ckpt.json or perturber.json), else perturb_at='vq', eps=0.3 relative to token norm (train.py's defaults)
perturb_at = None  # 'vq' | 'aligner'
eps = None  # the budget's radius: the game's eps_max, not the perturber's learned eps, so every arm faces one attack
eps_relative = None  # True: eps is a fraction of each token's norm
adv_steps = 5
adv_steps_strong = 0  # also a PGD attack with this many steps (robustness_adv_strong); 0: not
pixel_eps = ""  # comma list of L-inf budgets on the image itself, in /255 (e.g. '4,8'): robustness_pixel_4 ...; '': none
pixel_steps = 10
adv_step_size = 0.0  # per PGD step, in the units of eps; 0: 2.5 * eps / adv_steps (crosses the ball more than once)
buffer = ""  # a training out_dir: report the label-preservation rate of its hard buffer instead of evaluating
show = ""  # a folder: draw samples.png there (and buffer.png for a training out_dir) instead of evaluating (pictures.py)
show_n = 8  # samples in samples.png, and items in buffer.png
curves = ""  # a training out_dir (or its log.jsonl): draw its curves (and its mining log's hardness) into --show, else --out_dir
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
# -----------------------------------------------------------------------------------------------


def _bar(iterable=None, total=None, desc="", progress=True, **kw):
    """A progress bar that leaves nothing behind. It draws on the line it starts on (position 0): inside train.py's
    training bar it takes that line for a while, rather than opening one below it and moving the cursor back up
    with escape codes, which a log file would keep."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not progress, position=0, dynamic_ncols=True, **kw)


def _batches(records, size, progress, desc):
    for i in _bar(range(0, len(records), size), desc=desc, progress=progress):
        yield records[i:i + size]


def _pixels(umm, chunk):
    return umm.preprocess([r["image"] if torch.is_tensor(r["image"]) else load_image(r["image"]) for r in chunk])


def _mean(xs):
    return sum(xs) / max(1, len(xs))


# ---- answers: exact match on the world, the official VQA accuracy on real data ------------------
# The normalisation of the official VQA evaluation (processPunctuation, then processDigitArticle).

PUNCTUATION = frozenset(';/[]"{}()=+\\_-><@`,?!')  # "." and "'" are not here: periods have their own rule
COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d", re.ASCII)  # ASCII: the script is Python 2, where \d is [0-9]
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a lookahead that never fires (a typo
# for a lookbehind), so what it does is this: drop a period unless a digit follows ("3.5" stays, "dog." goes).
PERIOD = re.compile(r"\.(?!\d)", re.ASCII)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official table of contractions written without (all of) their apostrophes. Its one odd entry,
# "somebody'd" -> "somebodyd", is kept as it is, so that scores match the official script.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}


def process_punctuation(text):
    """Each punctuation mark is deleted when it touches a space somewhere in the text ("yes, it is") or
    when the text has a comma between digits ("1,000" -> "1000"), and becomes a space otherwise
    ("red-white" -> "red white"); then periods not followed by a digit are dropped, at most 32 of them, as
    in the official script (its re.UNICODE lands in re.sub's count argument)."""
    strip = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if strip or p + " " in text or " " + p in text else " ")
    return PERIOD.sub("", out, count=32)


def process_digit_article(text):
    """Lower-case; number words to digits ("two" -> "2", "none" -> "0"); articles dropped; contractions
    restored ("dont" -> "don't"); words rejoined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def clean_answer(text):
    """What the official script does to every answer first: newlines and tabs to spaces, ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text):
    return process_digit_article(process_punctuation(clean_answer(text)))


def evalai_answer(text):
    """lmms-eval's EvalAI answer processor, applied to every prediction there: lower-case, commas and
    question marks deleted, "'s" split off ("dog's" -> "dog 's"), then the normalisation above."""
    return normalize_answer(text.lower().replace(",", "").replace("?", "").replace("'s", " 's"))


VQA_CONVENTIONS = ("vqaeval", "lmms_eval", "normalize_both")


def vqa_accuracy(pred, answers, convention="vqaeval"):
    """VQA accuracy: the mean over the leave-one-annotator-out subsets of min(#matches among the others / 3,
    1) (ten subsets of nine on VQAv2), after one of three conventions for the answers' text:

    'vqaeval' (default): the official script, vqaEval.py of the VQA API, case for case. Every answer has
        its newlines, tabs and ends stripped; only when the annotators disagree are both sides normalised
        (normalize_answer). With ten identical answers the comparison is verbatim: "Two" scores 0 against
        ten "two", "dog" against ten "a dog".
    'lmms_eval': as lmms-eval scores VQAv2: the prediction always goes through evalai_answer, the
        annotators' answers as above.
    'normalize_both': both sides always normalised, for raw answers that were never normalised (a JSONL
        manifest).

    A single answer (a JSONL manifest), where the script has no other annotator and would score 0, is an
    exact match after the same processing."""
    if convention not in VQA_CONVENTIONS:
        raise ValueError(f"vqa_convention={convention!r}: expected one of {', '.join(map(repr, VQA_CONVENTIONS))}")
    if convention == "normalize_both":
        p, gts = normalize_answer(pred), [normalize_answer(a) for a in answers]
    else:
        p, gts = clean_answer(pred) if convention == "vqaeval" else evalai_answer(pred), [clean_answer(a) for a in answers]
        if len(set(gts)) > 1:  # the annotators disagree
            p, gts = normalize_answer(p), [normalize_answer(a) for a in gts]
    if len(gts) == 1:
        return float(p == gts[0])
    hits = [g == p for g in gts]
    return _mean([min((sum(hits) - h) / 3.0, 1.0) for h in hits])


def answer_score(pred, answers, vqa=False, convention="vqaeval"):
    """Exact match on the built-in world (one templated answer); VQA accuracy on real data."""
    return vqa_accuracy(pred, answers, convention) if vqa else float(pred == answers[0])


def label(record):
    """The answer trained and attacked on: the annotators' most common (first on ties), as in train.py."""
    return max(record["answers"], key=record["answers"].count)


# ---- understanding, generation, consistency ------------------------------------------------------

@torch.no_grad()
def understanding_scores(umm, records, embed=None, batch_size=64, progress=True, desc="understanding", convention="vqaeval"):
    """The answer score of each record's greedy answer: exact match on world samples, VQA accuracy on real
    ones (attrs None; `convention`: vqa_accuracy's). `embed` maps (pixels, questions, answers) to the
    understanding embeds the model answers from (default: umm.image_embeds of the pixels; see perturbed_embed)."""
    scores = []
    for chunk in _batches(records, batch_size, progress, desc):
        px, questions = _pixels(umm, chunk), [r["question"] for r in chunk]
        preds = umm.answer(embed(px, questions, [label(r) for r in chunk]) if embed else umm.image_embeds(px), questions)
        scores += [answer_score(p, r["answers"], r["attrs"] is None, convention) for p, r in zip(preds, chunk)]
    return scores


def understanding_accuracy(umm, records, embed=None, batch_size=64, progress=True, desc="understanding", convention="vqaeval"):
    """The mean of understanding_scores."""
    return _mean(understanding_scores(umm, records, embed, batch_size, progress, desc, convention))


@torch.no_grad()
def generate_images(umm, records, cfg_scale=1.0, temperature=0.0, batch_size=64, seed=0, progress=True):
    """uint8 images (3, S, S) the model generates from each record's caption."""
    g = torch.Generator(device=umm.device).manual_seed(seed)
    images = []
    for chunk in _batches(records, batch_size, progress, "generation"):
        codes = umm.generate_images([r["caption"] for r in chunk], cfg_scale=cfg_scale, temperature=temperature, generator=g)
        images += list(umm.to_uint8(umm.decode_codes(codes)))
    return images


def oracle_accuracy(images, records):
    """GenEval-style: the share of images in which the oracle reads exactly the objects of their record."""
    return _mean([oracle_score(im, r["attrs"]) for im, r in zip(images, records)])


def generation_score(umm, records, cfg_scale=1.0, temperature=0.0, batch_size=64, seed=0, progress=True):
    """Oracle score of images generated from the records' captions."""
    return oracle_accuracy(generate_images(umm, records, cfg_scale, temperature, batch_size, seed, progress), records)


@torch.no_grad()
def consistency_score(umm, images, records, batch_size=64, progress=True):
    """The model, shown the image it generated from a caption (images[i] from records[i]["caption"]),
    answers the questions that caption settles (data.caption_qa); exact-match accuracy over all
    (image, question) pairs. The images go through preprocess as any picture would."""
    embeds = torch.cat([umm.image_embeds(umm.preprocess(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
    pairs = [(i, q, a) for i, r in enumerate(records) for q, a in caption_qa(r["attrs"])]
    correct = []
    for chunk in _batches(pairs, batch_size, progress, "consistency"):
        preds = umm.answer(embeds[torch.tensor([i for i, _, _ in chunk], device=embeds.device)], [q for _, q, _ in chunk])
        correct += [p == a for p, (_, _, a) in zip(preds, chunk)]
    return _mean(correct)


@torch.no_grad()
def reconstruction_score(umm, records, batch_size=64, progress=True):
    """The oracle reads the VQ reconstruction (encode, project, decode) of each image correctly."""
    scores = []
    for chunk in _batches(records, batch_size, progress, "reconstruction"):
        rec = umm.vq_decode(umm.project_to_codebook(umm.vq_encode(_pixels(umm, chunk)))[0])
        scores += [oracle_score(im, r["attrs"]) for im, r in zip(umm.to_uint8(rec), chunk)]
    return _mean(scores)


# ---- robustness: perturbations at the game's interface ------------------------------------------

def perturbed_embed(umm, delta_fn, at="vq"):
    """(pixels, questions, answers) -> understanding embeds of the perturbed view: tokens at the interface
    `at`, plus delta_fn(tokens, questions, answers), through the same project-decode path as the game
    (model.perturbed_view)."""
    def embed(px, questions, answers):
        tokens = umm.visual_tokens(px, at)
        return umm.perturbed_view(tokens + delta_fn(tokens, questions, answers), at)[0]
    return embed


def perturber_delta(umm, perturber, at="vq", seed=0):
    """A Perturber as a delta function (tokens, questions, answers) -> δ, seeing what it saw in training
    (UMM.perturber_inputs): the gradient of the answer loss at the clean tokens, the question's embedding.
    One that sees noise draws it afresh on each call, from a generator of its own seeded with `seed`: the
    figures repeat, and a training run's RNG (its mining, its exact resume) is not touched."""
    g = torch.Generator(device=umm.device).manual_seed(seed)
    return lambda t, q, a: perturber(t, generator=g, **umm.perturber_inputs(perturber, t, q, a, at))


@torch.no_grad()
def codes_changed(umm, records, delta_fn, batch_size=64):
    """The share of image tokens whose codebook entry a perturbation changes (at 'vq'): how much of it survives
    the projection onto the codebook (a straight-through gradient can claim an effect where no code moves)."""
    changed = []
    for chunk in _batches(records, batch_size, False, ""):
        tokens = umm.visual_tokens(_pixels(umm, chunk), "vq")
        delta = delta_fn(tokens, [r["question"] for r in chunk], [label(r) for r in chunk])
        changed.append(umm.codes_changed(tokens, umm.project_to_codebook(tokens + delta)[1]).mean())
    return torch.stack(changed).mean().item()


def random_delta(eps, relative=True, seed=0, device="cpu"):
    """A random (not adversarial) perturbation of budget eps: the control for the perturber."""
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda tokens, *_: random_like(tokens, eps, relative=relative, generator=g)


def pgd_delta(umm, tokens, questions, answers, at="vq", eps=0.3, relative=True, steps=5, step_size=None, generator=None,
              on_step=None):
    """A fresh attack on the answer: L2 PGD on δ (perturber.pgd_attack) that maximises the answer
    cross-entropy of the view umm.perturbed_view(tokens + δ, at). At 'vq' the projection onto the
    codebook is straight-through, so the gradient reaches δ through decoder, vision encoder and LM.
    on_step, if given, is called after each step's forward pass (a progress bar's update)."""
    def loss(t):
        out = umm.perturbed_loss(t, questions, answers, at)
        if on_step:
            on_step()
        return out
    return pgd_attack(loss, tokens, eps, steps, step_size, relative, generator)


def adversarial_accuracy(umm, records, at="vq", eps=0.3, relative=True, steps=5, step_size=None, batch_size=64,
                         seed=0, progress=True, convention="vqaeval", baseline=True):
    """robustness_adv: accuracy under a PGD attack of budget eps at the interface `at`, a fresh one per
    batch (not the trained perturber). Returns {"accuracy", "accuracy_zero_delta", "ce_zero_delta",
    "ce_attacked"}: accuracy and mean answer cross-entropy of the same samples without and with the
    attack, both through the same view (at 'vq': the VQ reconstruction), so the gap is the attack's alone.
    On world samples at 'vq' also "scene_kept": per sample, whether the oracle still reads the sample's
    objects in the attacked image (an attack that redraws the scene changes the right answer too).
    baseline=False skips the zero-delta pass (its two figures are then None): train.py's table needs the attack's alone."""
    g = torch.Generator(device=umm.device).manual_seed(seed)
    acc0, acc1, ce0, ce1, changed, kept = [], [], [], [], [], []
    chunks = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    bar = _bar(total=len(chunks) * steps, desc=f"PGD attack ({len(records)} samples, {steps} steps a batch)", unit="step",
               progress=progress)  # moves with every step of the attack, each a forward and backward pass of a batch
    for chunk in chunks:
        questions, answers = [r["question"] for r in chunk], [label(r) for r in chunk]
        with torch.no_grad():
            tokens = umm.visual_tokens(_pixels(umm, chunk), at)
        delta = pgd_delta(umm, tokens, questions, answers, at, eps, relative, steps, step_size, g, on_step=bar.update)
        with torch.no_grad():
            for d, acc, ce in ((torch.zeros_like(delta), acc0, ce0), (delta, acc1, ce1))[0 if baseline else 1:]:
                emb, px, codes = umm.perturbed_view(tokens + d, at)
                ce.extend(umm.answer_loss(emb, questions, answers).tolist())
                acc.extend(answer_score(p, r["answers"], r["attrs"] is None, convention) for p, r in zip(umm.answer(emb, questions), chunk))
                if at == "vq" and d is delta:
                    changed.append(umm.codes_changed(tokens, codes))
                    kept += [oracle_score(im, r["attrs"]) for im, r in zip(umm.to_uint8(px), chunk) if r["attrs"]]
    bar.close()
    return {"accuracy": _mean(acc1), "accuracy_zero_delta": _mean(acc0) if acc0 else None, "ce_zero_delta": _mean(ce0) if ce0 else None, "ce_attacked": _mean(ce1),
            "codes_changed": torch.cat(changed).mean().item() if changed else None, "scores": acc1,
            "scene_kept": kept if len(kept) == len(acc1) else None}


def pixel_adversarial_scores(umm, records, eps=8 / 255, steps=10, batch_size=64, seed=0, progress=True, convention="vqaeval"):
    """Answer scores under an L-infinity PGD attack on the image itself (eps in [0, 1] pixel units, steps of
    2.5 * eps / steps by gradient sign, from a random start), straight into the understanding branch: no VQ
    model, so outside the game's threat model, a measure of how far robustness transfers."""
    g = torch.Generator(device=umm.device).manual_seed(seed)
    scores = []
    chunks = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    bar = _bar(total=len(chunks) * steps, desc=f"pixel PGD ({eps * 255:.0f}/255, {len(records)} samples, {steps} steps a batch)",
               unit="step", progress=progress)
    for chunk in chunks:
        questions, answers = [r["question"] for r in chunk], [label(r) for r in chunk]
        px = _pixels(umm, chunk)
        radius = eps / umm.image_std  # pixel units -> the model's normalised space
        lo, hi = (0 - umm.image_mean) / umm.image_std, (1 - umm.image_mean) / umm.image_std
        delta = (torch.rand(px.shape, generator=g, device=px.device) * 2 - 1) * radius
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = umm.answer_loss(umm.image_embeds((px + delta).clamp(lo, hi)), questions, answers).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + 2.5 * radius / steps * grad.sign()).clamp(-radius, radius)
            bar.update()
        with torch.no_grad():
            preds = umm.answer(umm.image_embeds((px + delta).clamp(lo, hi)), questions)
        scores += [answer_score(p, r["answers"], r["attrs"] is None, convention) for p, r in zip(preds, chunk)]
    bar.close()
    return scores


def summary(umm, records, perturber=None, at="vq", attack=None, attack_n=0, progress=True):
    """train.py's before / after table: clean accuracy; accuracy under a perturber when there is one; under a
    fresh PGD attack when `attack` is given (adversarial_accuracy's eps, relative, steps), on the first attack_n
    records (0: all), the costliest row."""
    umm.eval()
    res = {"clean": understanding_accuracy(umm, records, progress=progress, desc="accuracy: clean")}
    if perturber is not None:
        res["under_perturber"] = understanding_accuracy(umm, records, perturbed_embed(umm, perturber_delta(umm, perturber, at), at),
                                                        progress=progress, desc="accuracy: under the perturber")
    if attack:
        attacked = records[:attack_n or None]
        res[f"under_pgd_{attack['steps']}_steps" + (f"_on_{len(attacked)}" if len(attacked) < len(records) else "")] = \
            adversarial_accuracy(umm, attacked, at, progress=progress, baseline=False, **attack)["accuracy"]
    return res


def table(before, after, head, n):
    """summary()'s figures before and after training, one row each, as train.py prints them at the end."""
    rows = [f"{'accuracy on ' + str(n) + ' eval samples':<34}{head:>{len(head) + 2}}{'after':>8}"]
    return "\n".join(rows + [f"{k:<34}{before[k]:>{len(head) + 2}.3f}{after[k]:>8.3f}" for k in after])


def evaluate(umm, records, gen_n=0, progress=True, **gen_kw):
    """Quick figures used during training: understanding, generation (gen_n captions) and the
    oracle's reading of VQ reconstructions, on `records` (samples of the built-in world)."""
    res = {"understanding": understanding_accuracy(umm, records, progress=progress)}
    if gen_n and records[0].get("attrs"):
        res["generation"] = generation_score(umm, records[:gen_n], progress=progress, **gen_kw)
        res["reconstruction"] = reconstruction_score(umm, records[:gen_n], progress=progress)
    return res


# ---- checkpoints ----------------------------------------------------------------------------------

def locate(path):
    """(model directory, ckpt.json contents or {}, checkpoint directory or None) for --ckpt: a Hugging Face
    directory, a training checkpoint (holding ckpt.json) or a training out_dir (holding ckpt/)."""
    if os.path.isfile(os.path.join(path, "ckpt", "ckpt.json")):
        path = os.path.join(path, "ckpt")
    if os.path.isfile(os.path.join(path, "ckpt.json")):
        with open(os.path.join(path, "ckpt.json")) as f:
            meta = json.load(f)
        return os.path.join(path, meta.get("model", "model")), meta, path
    return path, {}, None


def load(path, device):
    from model import UMM
    return UMM.from_pretrained(locate(path)[0]).to(device).eval().requires_grad_(False)


def _perturber_export(path):
    """The folder holding a standalone perturber export (perturber.safetensors + perturber.json, as
    model.save_perturber writes it beside an exported model): --ckpt itself or its model directory."""
    for folder in dict.fromkeys([path, locate(path)[0]]):
        if all(os.path.isfile(os.path.join(folder, f)) for f in ("perturber.safetensors", "perturber.json")):
            return folder
    return None


def trained_budget(path):
    """The game's settings a checkpoint was trained with, {"perturb_at", "eps_min", "eps_max", "relative",
    "sees", "from"}: from its perturber.json, else its training config (ckpt.json), else train.py's defaults
    ('vq', eps in [0, 0.3] relative to token norm)."""
    cfg = locate(path)[1].get("config", {})
    spec = {"perturb_at": cfg.get("perturb_at", "vq"), "eps_min": cfg.get("eps_min", 0.0),
            "eps_max": cfg.get("eps_max", 0.3), "relative": cfg.get("eps_relative", True), "sees": cfg.get("perturber_sees", "token"),
            "from": "ckpt.json" if cfg else "defaults"}
    folder = _perturber_export(path)
    if folder:
        with open(os.path.join(folder, "perturber.json")) as f:
            saved = json.load(f)
        spec.update({k: saved[k] for k in ("perturb_at", "eps_min", "eps_max", "relative", "sees") if k in saved})
        spec["from"] = os.path.join(folder, "perturber.json")
    return spec


def own_perturber(path, device="cpu"):
    """The checkpoint's own trained perturber: (Perturber, its settings) or (None, why there is none).

    Read from a standalone export (perturber.safetensors + perturber.json) in --ckpt or its model
    directory, else from the `perturber.*` tensors of a training checkpoint's state with the budget of its
    config. A training checkpoint whose optimizer holds no perturber moments (an SFT run, or a perturber
    that never stepped) has only an untrained perturber, and that is not reported as its own."""
    _, meta, ckpt_dir = locate(path)
    if ckpt_dir is not None:
        optim = os.path.join(ckpt_dir, "optim.safetensors")
        if os.path.isfile(optim):
            with safe_open(optim, "pt") as f:
                if not any(k.startswith("perturber.") for k in f.keys()):
                    return None, (f"the perturber of {ckpt_dir} never trained (game={meta.get('config', {}).get('game')}, "
                                  "no optimizer moments)")
    folder = _perturber_export(path)
    if folder:
        from model import load_perturber
        perturber, _ = load_perturber(folder, device)
        return perturber.eval().requires_grad_(False), {**trained_budget(path), "eps": perturber.eps.item(),
                                                         "source": os.path.join(folder, "perturber.safetensors")}
    if ckpt_dir is None:
        return None, f"{path} has no perturber.safetensors + perturber.json and is not a training checkpoint"
    source = os.path.join(ckpt_dir, "state.safetensors")
    tensors = {k.removeprefix("perturber."): v for k, v in load_file(source).items() if k.startswith("perturber.")}
    if not tensors:
        return None, f"{source} holds no perturber tensors"
    spec = trained_budget(path)
    dim, hidden = tensors["net.4.weight"].shape
    lo, hi = float(spec["eps_min"]), float(spec["eps_max"])
    sizes = {"noise_dim": tensors["net.0.weight"].shape[1] - dim * (2 if "grad" in parse_sees(spec["sees"]) else 1),  # the rest of its input
             "question_dim": tensors["question.weight"].shape[1] if "question.weight" in tensors else 0,
             "tokens": len(tensors["pos"]) if "pos" in tensors else 0}
    perturber = Perturber(dim, hidden, lo, hi, eps_init=(lo + hi) / 2, relative=bool(spec["relative"]), sees=spec["sees"], **sizes)  # θ_ε is loaded
    perturber.load_state_dict(tensors)
    perturber.to(device).eval().requires_grad_(False)
    return perturber, {**spec, "sees": perturber.sees, "eps": perturber.eps.item(), "source": source}  # sees: canonical


# ---- the hard buffer's labels ------------------------------------------------------------------------

def answer_from_attrs(question, attrs):
    """The answer a world question has in a scene (attrs as data.read_attrs reads them), or None when
    it names no single object there ("what color is the circle?" with no circle, or two)."""
    objs = attrs["objects"]

    def of_the_one(key, value, field):
        hits = [o for o in objs if o[key] == value]
        return hits[0][field] if len(hits) == 1 else None

    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return of_the_one("shape", m[1], "color")
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return of_the_one("color", m[1], "shape")
    if m := re.fullmatch(r"where is the (\w+)\?", question):
        return of_the_one("shape", m[1], "pos")
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    if question == "how many shapes are there?":
        return str(len(objs))
    raise ValueError(f"not a question of the built-in world: {question!r}")


def read_buffer(ckpt_dir):
    """The hard buffer of a training checkpoint, rank 0's, as train.py wrote it (checkpoint.py): items and their H."""
    state = checkpoint.read_state(ckpt_dir, "buffer0")
    return state["items"], state["H"]


@torch.no_grad()
def label_preservation(run, device="cpu", batch_size=64, progress=True):
    """The share of a run's buffered hard samples whose label still holds: each item's codes are decoded
    to its image, the oracle reads the objects, and the item's question is answered from that reading
    (answer_from_attrs); the label holds when that answer is the stored one. Also the stricter scene
    preservation: the oracle reads exactly the objects of the source sample (re-drawn from its
    "shapes/{split}/{i}" source with the world seed train.py uses, 0, and checked by its question)."""
    model_dir, meta, ckpt_dir = locate(run)
    if ckpt_dir is None:
        raise SystemExit(f"--buffer={run}: no training checkpoint there (ckpt.json or ckpt/ckpt.json)")
    cfg = meta.get("config", {})
    items, H = read_buffer(ckpt_dir)
    res = {"buffer_rule": cfg.get("buffer_rule"), "tau": cfg.get("tau"), "q_hard": cfg.get("q_hard"),
           "consistency_scorer": "clip" if cfg.get("clip_path") else "built-in", "perturb_at": cfg.get("perturb_at"),
           "mine": cfg.get("mine"), "iter": meta.get("iter_num"), "buffer_size": len(items), "checkpoint": ckpt_dir}
    world = [it for it in items if str(it.get("source", "")).startswith("shapes/")]
    if not world or "codes" not in world[0]:
        why = ("the buffer is empty" if not items else "no item comes from the built-in world" if not world else
               "its items are an image plus an LM-space delta (perturb_at='aligner'), not a picture the oracle can read")
        return {**res, "count": 0, "label_preservation": None, "scene_preservation": None, "note": why}
    where = [(it["source"].split("/")[1], int(it["source"].split("/")[2])) for it in world]
    originals = {s: shapes_world(s, max(i for t, i in where if t == s) + 1, seed=0) for s in {s for s, _ in where}}
    umm = load(model_dir, device)
    labels, scenes = [], []
    for start in tqdm(range(0, len(world), batch_size), desc="buffer", leave=False, disable=not progress):
        chunk = world[start:start + batch_size]
        images = umm.to_uint8(umm.decode_codes(torch.stack([it["codes"] for it in chunk]).to(umm.device)))
        for im, it, (s, i) in zip(images, chunk, where[start:start + batch_size]):
            source = originals[s][i]
            if source["question"] != it["question"]:
                raise SystemExit(f"{it['source']}: the world re-drawn with seed 0 asks {source['question']!r}, the buffer "
                                 f"item {it['question']!r}; was the run's world drawn with another seed?")
            labels.append(answer_from_attrs(it["question"], read_attrs(im)) == it["answer"])
            scenes.append(oracle_score(im, source["attrs"]))
    return {**res, "count": len(labels), "label_preservation": _mean(labels), "scene_preservation": _mean(scenes),
            "mean_H": H.double().mean().item()}


# ---- comparing runs -------------------------------------------------------------------------------

def train_cost(run_dir):
    """{"train_s_per_step", "train_cpu_s_per_step"}: the median over a training run's logged steps (its
    log.jsonl, train.py's phase times), or {} where there is none."""
    path = os.path.join(run_dir, "log.jsonl")
    steps = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    steps = [r for r in steps if "ms" in r]
    if not steps:
        return {}
    median = lambda xs: sorted(xs)[len(xs) // 2]
    return {"train_s_per_step": median([r["ms"]["step"] for r in steps]) / 1e3,
            "train_cpu_s_per_step": median([r["cpu_ms"]["step"] for r in steps]) / 1e3}


def plot_cost(groups, key, path):
    """A PNG: one point per group of runs, `key` (mean ± sd over its runs) against training CPU seconds per step."""
    from PIL import Image, ImageDraw
    pts = []
    for name, runs in groups:
        ys, xs = [r[key] for r in runs if key in r], [r["train_cpu_s_per_step"] for r in runs if "train_cpu_s_per_step" in r]
        if ys and xs:
            m = sum(ys) / len(ys)
            pts.append((os.path.basename(name).split("-s")[0], sum(xs) / len(xs), m, (sum((y - m) ** 2 for y in ys) / max(1, len(ys) - 1)) ** 0.5))
    if not pts:
        raise SystemExit(f"--plot: no run has both {key} and its training time (log.jsonl)")
    W, H, L, B = 560, 380, 60, 50
    x1, y0 = max(p[1] for p in pts) * 1.15, min(p[2] - p[3] for p in pts) - 0.02
    y1 = max(p[2] + p[3] for p in pts) + 0.02
    X = lambda x: L + (W - L - 20) * x / x1
    Y = lambda y: H - B - (H - B - 20) * (y - y0) / (y1 - y0)
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.line([(L, 20), (L, H - B), (W - 20, H - B)], fill="black")
    for i in range(5):  # axis ticks
        xv, yv = x1 * i / 4, y0 + (y1 - y0) * i / 4
        d.text((X(xv) - 10, H - B + 5), f"{xv:.1f}", fill="black")
        d.text((5, Y(yv) - 5), f"{yv:.3f}", fill="black")
    d.text((W // 2 - 80, H - 22), "training CPU seconds per step", fill="black")
    d.text((L + 5, 4), f"{key} (mean ± sd over seeds)", fill="black")
    for label, x, y, sd in pts:
        d.line([(X(x), Y(y - sd)), (X(x), Y(y + sd))], fill="gray")
        d.ellipse([X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4], fill="black")
        d.text((X(x) + 7, Y(y) - 6), label, fill="black")
    im.save(path)


def compare(patterns, plot="", bars=""):
    """A table of the eval.json figures of several runs side by side, deltas against the first column.
    Each argument is a directory holding eval.json (or the file itself) or a glob of them; a glob's
    runs are averaged: mean ± sample standard deviation, over the runs that have the figure."""
    groups = []
    for pattern in patterns:
        files = [p if p.endswith(".json") else os.path.join(p, "eval.json") for p in sorted(glob.glob(pattern))]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise SystemExit(f"--compare: no eval.json matches {pattern!r}")
        runs = []
        for f in files:
            with open(f) as fh:
                runs.append({**json.load(fh), **train_cost(os.path.dirname(f))})
        groups.append((pattern, runs))
    keys = []  # every numeric figure, in the order it first appears
    for _, runs in groups:
        for r in runs:
            keys += [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]

    def stats(runs, key):
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if not vals:
            return None
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return m, sd, len(vals)

    header = ["metric"]
    for j, (pattern, runs) in enumerate(groups):
        header.append(f"{pattern} ({len(runs)} run{'s' * (len(runs) > 1)})")
        if j:
            header.append("Δ")
    rows = [header]
    for key in keys:
        row, first = [key], stats(groups[0][1], key)
        for j, (_, runs) in enumerate(groups):
            s = stats(runs, key)
            cell = "—" if s is None else f"{s[0]:.3f}" + (f" ± {s[1]:.3f}" if len(runs) > 1 else "")
            if s is not None and s[2] < len(runs):
                cell += f" [{s[2]} of {len(runs)}]"
            row.append(cell)
            if j:
                row.append("—" if s is None or first is None else f"{s[0] - first[0]:+.3f}")
        rows.append(row)
    # paired differences: the same samples in every run (eval.json's per_sample scores), the k-th run of each glob
    # paired with the k-th of the first (e.g. the same seed); 95 % interval of the mean difference by resampling
    # the samples (the same resample for every pair of runs), 2000 times
    paired = []
    for key in keys:
        for j, (pattern, runs) in enumerate(groups[1:], 1):
            pairs = [(a["per_sample"][key], b["per_sample"][key]) for a, b in zip(groups[0][1], runs)
                     if key in a.get("per_sample", {}) and key in b.get("per_sample", {})]
            if not pairs or any(len(a) != len(b) for a, b in pairs):
                continue
            d = torch.tensor([[y - x for x, y in zip(a, b)] for a, b in pairs], dtype=torch.float64)  # (runs, samples)
            g = torch.Generator().manual_seed(0)
            boots = d[:, torch.randint(d.shape[1], (2000, d.shape[1]), generator=g)].mean((0, 2))
            lo, hi = boots.quantile(0.025).item(), boots.quantile(0.975).item()
            per_run = ", ".join(f"{x:+.3f}" for x in d.mean(1).tolist())
            paired.append(f"{key:<30} {pattern} − {groups[0][0]}: {d.mean().item():+.3f} [{lo:+.3f}, {hi:+.3f}]  per run: {per_run}")
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))).rstrip()
                      for r in rows)
    if plot:  # --compare ... --plot=file.png: robustness against training cost, one point per group
        plot_cost(groups, "robustness_adv", plot)
    if bars:  # --compare ... --bars=file.png: the table as bars, the seeds' spread drawn (pictures.py, matplotlib)
        import pictures
        pictures.draw_bars(groups, bars)
    return table + ("\n\npaired differences, mean [95 % bootstrap interval over samples]:\n" + "\n".join(paired) if paired else "")


# -----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:  # before the configurator, which would read the directories as config files
        plot = [a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--plot=")]
        bars = [a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--bars=")]
        print(compare([a for a in sys.argv[2:] if not a.startswith(("--plot=", "--bars="))], plot[0] if plot else "", bars[0] if bars else ""))
        sys.exit(0)
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    t_start = time.time()
    if vqa_convention not in VQA_CONVENTIONS or answer_tokens < 1:
        raise SystemExit(f"config error: vqa_convention={vqa_convention!r} (one of {', '.join(map(repr, VQA_CONVENTIONS))}), "
                         f"answer_tokens={answer_tokens} (>= 1)")

    if buffer:
        res = label_preservation(buffer, device)
        path = os.path.join(buffer, "label_preservation.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        for k, v in res.items():
            print(f"{k:<22}{v:.3f}" if isinstance(v, float) else f"{k:<22}{v}")
        print(f"wrote {path}")
        sys.exit(0)
    if curves:  # a run's curves from its log.jsonl (pictures.py)
        import pictures
        for path in pictures.curves(curves, show or out_dir):
            print(f"wrote {path}")
        sys.exit(0)

    torch.manual_seed(seed)
    model_dir, meta, _ = locate(ckpt)
    umm = load(ckpt, device)
    umm.answer_tokens = answer_tokens
    umm.prompt_suffix = meta.get("config", {}).get("prompt_suffix", "") if prompt_suffix is None else prompt_suffix
    own, own_info = own_perturber(ckpt, device)
    # the attack's budget and interface: the flags, else as the checkpoint was trained
    trained = trained_budget(ckpt)
    at = perturb_at or trained["perturb_at"]
    radius = eps if eps is not None else trained["eps_max"]
    relative = eps_relative if eps_relative is not None else trained["relative"]
    step_size = adv_step_size or 2.5 * radius / max(adv_steps, 1)  # pgd_attack's own default, recorded

    already_skipped = len(bad_samples)  # in this process, before this evaluation
    if data == "shapes":
        test, ood = shapes_world("test", n, seed=seed), shapes_world("ood", n, seed=seed)
    elif data in ("vqav2", "jsonl"):
        if data == "vqav2" and not (vqav2_questions and vqav2_annotations and vqav2_images):
            raise SystemExit("config error: data='vqav2' needs --vqav2_questions, --vqav2_annotations and --vqav2_images")
        if data == "jsonl" and not jsonl_path:
            raise SystemExit("config error: data='jsonl' needs --jsonl_path")
        try:  # the first n samples whose image decodes; a bad one stops here, named, or is skipped (skip_bad)
            test = readable(load_vqav2(vqav2_questions, vqav2_annotations, vqav2_images, skip_bad) if data == "vqav2"
                            else load_jsonl(jsonl_path, skip_bad), n, skip_bad)
            if not test:
                raise BadData(f"no sample of {vqav2_questions if data == 'vqav2' else jsonl_path} has a readable image")
        except BadData as e:
            raise SystemExit(f"data error: {e}") from None
    else:
        raise SystemExit(f"config error: data={data!r}: expected 'shapes', 'vqav2' or 'jsonl'")
    captioned = test[:gen_n]
    if show:  # pictures instead of figures (pictures.py): the same budget as the attack below
        import pictures
        for path in pictures.show(umm, ckpt, test[:show_n], show, own, own_info["perturb_at"] if own is not None else at, at,
                                  radius, relative, adv_steps, step_size, cfg_scale, temperature, seed, show_n):
            print(f"wrote {path}")
        sys.exit(0)

    res, skipped, seconds, per_sample = {}, {}, {}, {}
    t_axes = time.time()

    def record(key, value):  # a figure (a mean, or per-sample scores kept for paired comparisons), and its seconds
        if isinstance(value, list):
            per_sample[key], value = value, _mean(value)
        res[key] = value
        seconds[key] = time.time() - t_axes - sum(seconds.values())

    record("understanding", understanding_scores(umm, test, batch_size=batch_size, convention=vqa_convention))
    if data == "shapes":
        images = generate_images(umm, captioned, cfg_scale, temperature, batch_size, seed)  # generated once, used twice
        record("generation", oracle_accuracy(images, captioned))
        record("consistency", consistency_score(umm, images, captioned, batch_size))
        record("robustness_ood", understanding_scores(umm, ood, batch_size=batch_size, desc="ood"))
    else:
        for k in ("generation", "consistency", "robustness_ood"):
            skipped[k] = "needs the built-in world (captions, the oracle, the ood split)"
    attack = adversarial_accuracy(umm, test[:adv_n], at, radius, relative, adv_steps, step_size, batch_size, seed, convention=vqa_convention)
    attack.pop("accuracy")
    kept = attack.pop("scene_kept")
    record("robustness_adv", attack.pop("scores"))
    if kept:  # the attacked images whose scene the oracle still reads, and the accuracy on those alone
        record("robustness_adv_scene_kept", kept)
        res["robustness_adv_where_kept"] = sum(a for a, k in zip(per_sample["robustness_adv"], kept) if k) / max(1, sum(kept))
    attack = {"perturb_at": at, "eps": radius, "relative": relative, "steps": adv_steps, "step_size": step_size,
              "n": len(test[:adv_n]), **attack}
    if adv_steps_strong:
        strong = adversarial_accuracy(umm, test[:adv_n], at, radius, relative, adv_steps_strong, None, batch_size, seed,
                                      convention=vqa_convention)
        record("robustness_adv_strong", strong.pop("scores"))
        attack["strong"] = {"steps": adv_steps_strong, "codes_changed": strong["codes_changed"], "ce_attacked": strong["ce_attacked"]}
    for e in [float(x) for x in pixel_eps.split(",") if x.strip()]:
        record(f"robustness_pixel_{e:g}", pixel_adversarial_scores(umm, test[:adv_n], e / 255, pixel_steps, batch_size, seed,
                                                                    convention=vqa_convention))
    random_fn = random_delta(radius, relative, seed, device)
    record("understanding_random_perturb", understanding_scores(umm, test, perturbed_embed(umm, random_fn, at), batch_size,
                                                                 desc="random perturbation", convention=vqa_convention))
    if own is not None:
        own_view = perturbed_embed(umm, perturber_delta(umm, own, own_info["perturb_at"]), own_info["perturb_at"])
        record("understanding_own_perturber", understanding_scores(umm, test, own_view, batch_size, desc="own perturber",
                                                                    convention=vqa_convention))
    else:
        skipped["understanding_own_perturber"] = own_info
    if at == "vq":  # how much of each perturbation survives the projection onto the codebook
        changed = {"pgd": attack["codes_changed"], "random": codes_changed(umm, test[:adv_n], random_delta(radius, relative, seed, device))}
        if own is not None and own_info["perturb_at"] == "vq":
            changed["own_perturber"] = codes_changed(umm, test[:adv_n], perturber_delta(umm, own))
        attack["codes_changed_by"] = changed
    if data == "shapes":
        record("reconstruction", reconstruction_score(umm, test, batch_size=batch_size))

    settings = {"ckpt": ckpt, "model": model_dir, "n": len(test), "gen_n": len(captioned) if data == "shapes" else 0,
                "cfg_scale": cfg_scale, "temperature": temperature, "seed": seed, "trained_iters": meta.get("iter_num"),
                "game": meta.get("config", {}).get("game"), "budget_from": trained["from"] if eps is None else "flags",
                "total_s": round(time.time() - t_start, 1), "vqa_convention": vqa_convention, "prompt_suffix": umm.prompt_suffix,
                "answer_tokens": answer_tokens, "skipped_samples": len(bad_samples) - already_skipped}
    out = {**res, "data": data, "robustness_adv_attack": attack,
           "random_perturb": {"perturb_at": at, "eps": radius, "relative": relative},
           "own_perturber": own_info if own is not None else None, "skipped": skipped, "per_sample": per_sample,
           "seconds": {k: round(v, 1) for k, v in seconds.items()}, "settings": settings}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"{'metric':<30}{'value':>8}   ({data}, {ckpt})")
    for k, v in res.items():
        print(f"{k:<30}{v:>8.3f}")
    for k, why in skipped.items():
        print(f"{k:<30}{'—':>8}   skipped: {why}")
    print(f"attack: PGD at '{at}', eps {radius:g} ({'relative to token norm' if relative else 'absolute'}), "
          f"{adv_steps} steps of {step_size:.3g}, {attack['n']} samples: accuracy {attack['accuracy_zero_delta']:.3f} -> "
          f"{res['robustness_adv']:.3f}, answer CE {attack['ce_zero_delta']:.3f} -> {attack['ce_attacked']:.3f}")
    if "codes_changed_by" in attack:
        print("codes changed (share of image tokens): " + ", ".join(f"{k} {v:.3f}" for k, v in attack["codes_changed_by"].items()))
    if own is not None:
        print(f"own perturber: at '{own_info['perturb_at']}', eps {own_info['eps']:.3f} of [{own_info['eps_min']}, "
              f"{own_info['eps_max']}], from {own_info['source']}")
    if bad_samples[already_skipped:]:
        print(describe_skips(bad_samples[already_skipped:], "when reading the data"))
    print(f"wrote {os.path.join(out_dir, 'eval.json')} in {time.time() - t_start:.0f}s")
