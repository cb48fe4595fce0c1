"""
Evaluation of a UniGame / base checkpoint on the built-in world.

    python eval.py --ckpt=assets/shapes-base --out_dir=out/eval-base

--ckpt is a Hugging Face directory (assets/shapes-base, an export) or a training checkpoint
(out/ckpt, whose model/ is used). Writes out_dir/eval.json and prints a table. Fractions in [0, 1].
"""

import json
import os

import torch
from tqdm import tqdm

import data
from perturber import random_like

# -----------------------------------------------------------------------------------------------
ckpt = "assets/shapes-base"
out_dir = "out/eval"
n = 1000  # test (and ood) samples for understanding
gen_n = 200  # test captions for generation
batch_size = 64
cfg_scale = 1.0  # classifier-free guidance for generation (1: none; the shipped base was trained without
#                 unconditional prompts, so guidance only amplifies noise there: 0.02 at 5.0 vs 0.99 at 1.0)
temperature = 0.0  # 0: greedy image tokens
eps = 0.3  # budget of the random perturbation (relative to token norm on codebook space): train.py's eps_max
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
# -----------------------------------------------------------------------------------------------


def _batches(records, size, progress, desc):
    it = range(0, len(records), size)
    for i in tqdm(it, desc=desc, leave=False, disable=not progress):
        yield records[i:i + size]


def _pixels(umm, chunk):
    return umm.preprocess([r["image"] if torch.is_tensor(r["image"]) else data.load_image(r["image"]) for r in chunk])


def answer_score(pred, answers):
    """Exact match for single-answer data; min(#matching annotators / 3, 1) with several answers."""
    if len(answers) == 1:
        return float(pred == answers[0])
    return min(sum(a == pred for a in answers) / 3.0, 1.0)


@torch.no_grad()
def understanding_accuracy(umm, records, embed=None, batch_size=64, progress=True, desc="understanding"):
    """Mean answer score of greedy answers. `embed` maps pixels to the understanding embeds the model
    answers from (default: umm.image_embeds; see perturbed_embed)."""
    scores = []
    for chunk in _batches(records, batch_size, progress, desc):
        px = _pixels(umm, chunk)
        preds = umm.answer((embed or umm.image_embeds)(px), [r["question"] for r in chunk])
        scores += [answer_score(p, r["answers"]) for p, r in zip(preds, chunk)]
    return sum(scores) / max(1, len(scores))


@torch.no_grad()
def generation_score(umm, records, cfg_scale=1.0, temperature=0.0, batch_size=64, seed=0, progress=True):
    """GenEval-style: the oracle reads every object of the caption back from the generated image."""
    g = torch.Generator(device=umm.device).manual_seed(seed)
    scores = []
    for chunk in _batches(records, batch_size, progress, "generation"):
        codes = umm.generate_images([r["caption"] for r in chunk], cfg_scale=cfg_scale, temperature=temperature, generator=g)
        images = umm.to_uint8(umm.decode_codes(codes))
        scores += [data.oracle_score(im, r["attrs"]) for im, r in zip(images, chunk)]
    return sum(scores) / max(1, len(scores))


@torch.no_grad()
def reconstruction_score(umm, records, batch_size=64, progress=True):
    """The oracle reads the VQ reconstruction (encode, project, decode) of each image correctly."""
    scores = []
    for chunk in _batches(records, batch_size, progress, "reconstruction"):
        rec = umm.vq_decode(umm.project_to_codebook(umm.vq_encode(_pixels(umm, chunk)))[0])
        scores += [data.oracle_score(im, r["attrs"]) for im, r in zip(umm.to_uint8(rec), chunk)]
    return sum(scores) / max(1, len(scores))


def perturbed_embed(umm, delta_fn, at="vq"):
    """pixels -> understanding embeds of the perturbed view: tokens at the interface `at`, plus
    delta_fn(tokens), through the same project-decode path as the game (model.perturbed_view)."""
    def embed(px):
        tokens = umm.visual_tokens(px, at)
        return umm.perturbed_view(tokens + delta_fn(tokens), at)[0]
    return embed


def random_delta(eps, relative=True, seed=0, device="cpu"):
    """A random (not adversarial) perturbation of budget eps: the control for the perturber."""
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda tokens: random_like(tokens, eps, relative=relative, generator=g)


def evaluate(umm, records, gen_n=0, progress=True, **gen_kw):
    """Quick figures used during training: understanding, generation (gen_n captions) and the
    oracle's reading of VQ reconstructions, on `records` (samples of the built-in world)."""
    res = {"understanding": understanding_accuracy(umm, records, progress=progress)}
    if gen_n and records[0].get("attrs"):
        res["generation"] = generation_score(umm, records[:gen_n], progress=progress, **gen_kw)
        res["reconstruction"] = reconstruction_score(umm, records[:gen_n], progress=progress)
    return res


def load(path, device):
    from model import UMM
    if os.path.isfile(os.path.join(path, "ckpt.json")):
        path = os.path.join(path, "model")
    return UMM.from_pretrained(path).to(device).eval()


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    torch.manual_seed(seed)
    umm = load(ckpt, device)
    test = data.shapes_world("test", n, seed=seed)
    ood = data.shapes_world("ood", n, seed=seed)
    res = {
        "understanding": understanding_accuracy(umm, test, batch_size=batch_size),
        "generation": generation_score(umm, test[:gen_n], cfg_scale, temperature, batch_size, seed),
        "reconstruction": reconstruction_score(umm, test, batch_size=batch_size),
        "robustness_ood": understanding_accuracy(umm, ood, batch_size=batch_size, desc="ood"),
        "understanding_random_perturb": understanding_accuracy(
            umm, test, perturbed_embed(umm, random_delta(eps, seed=seed, device=device)), batch_size, desc="random perturbation"),
    }
    meta = {"ckpt": ckpt, "n": n, "gen_n": gen_n, "cfg_scale": cfg_scale, "temperature": temperature,
            "random_perturb_eps": eps, "seed": seed}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({**res, "settings": meta}, f, indent=2)
    print(f"{'metric':<30}{'value':>8}")
    for k, v in res.items():
        print(f"{k:<30}{v:>8.3f}")
    print(f"wrote {os.path.join(out_dir, 'eval.json')}")
