"""UniGame's tests: a specification that runs on CPU in well under a minute. `python -m pytest -q test_unigame.py`"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from model import UMM, add_lora, build_tokenizer, merge_lora, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- model.py ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    return data.shapes_world("train", 64, seed=0)


@pytest.fixture(scope="module")
def tok(world):
    texts = [s["question"] for s in world] + [s["caption"] for s in world] + [s["answers"][0] for s in world]
    return build_tokenizer(texts, 400)


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return UMM.from_config(tiny_config(tok, lm_width=64, lm_layers=2, vision_width=64, vision_layers=1), tok).eval()


@pytest.fixture(scope="module")
def umm(tok):
    return tiny(tok)


def batch_of(world, n=4):
    s = world[:n]
    return [r["image"] for r in s], [r["question"] for r in s], [r["answers"][0] for r in s], [r["caption"] for r in s]


def test_save_and_reload_gives_identical_outputs(umm, world, tmp_path):
    images, qs, ans, caps = batch_of(world)
    px = umm.preprocess(images)
    umm.save_pretrained(tmp_path / "m")
    again = UMM.from_pretrained(str(tmp_path / "m")).eval()
    with torch.no_grad():
        assert torch.equal(umm.answer_loss(umm.image_embeds(px), qs, ans), again.answer_loss(again.image_embeds(px), qs, ans))
        codes = umm.image_codes(px)
        assert torch.equal(codes, again.image_codes(px))
        assert torch.equal(umm.image_loss(caps, codes), again.image_loss(caps, codes))
    # and transformers alone can load it
    from transformers import JanusForConditionalGeneration
    JanusForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_understanding_logits_equal_janus_forward(umm, world):
    images, qs, ans, _ = batch_of(world, 1)
    px = umm.preprocess(images)
    ids = torch.tensor([umm.prompt_ids(qs[0]) + umm.answer_ids(ans[0])])
    assert (ids == umm.image_id).sum() == umm.num_image_tokens
    with torch.no_grad():
        ref = umm.janus(input_ids=ids, pixel_values=px).logits
        mine, labels = umm.answer_logits(umm.image_embeds(px), qs, ans)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_answer_loss_is_masked_cross_entropy_and_padding_invariant(umm, world):
    images, qs, ans, _ = batch_of(world)
    qs[1] = "how many shapes are there in this picture, please?"  # a longer prompt: left padding in the batch
    ans[2] = "a much longer answer"
    with torch.no_grad():
        emb = umm.image_embeds(umm.preprocess(images))
        loss = umm.answer_loss(emb, qs, ans)
        logits, labels = umm.answer_logits(emb, qs, ans)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        torch.testing.assert_close(loss, ce.sum(1) / (labels[:, 1:] != -100).sum(1))
        alone = torch.cat([umm.answer_loss(emb[i:i + 1], qs[i:i + 1], ans[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(loss, alone, rtol=1e-4, atol=1e-5)
        assert umm.answer(emb, qs) == sum((umm.answer(emb[i:i + 1], qs[i:i + 1]) for i in range(4)), [])


def test_projection_lands_on_codebook_and_passes_gradient(umm, world):
    px = umm.preprocess(batch_of(world)[0])
    z = umm.vq_encode(px).detach().requires_grad_()
    zq, codes = umm.project_to_codebook(z)
    torch.testing.assert_close(zq, umm.codebook[codes], rtol=0, atol=1e-6)
    # nearest in the space decoding uses: no codebook entry is closer to the normalised token
    dist = torch.cdist(F.normalize(z.detach(), dim=-1), umm.codebook[None])
    assert torch.equal(dist.argmin(-1), codes)
    (zq * torch.randn_like(zq)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # the projected tokens decode exactly as transformers decodes the codes
    with torch.no_grad():
        torch.testing.assert_close(umm.vq_decode(zq), umm.janus.model.vqmodel.decode(codes), rtol=1e-4, atol=1e-4)


def test_lora_merge_leaves_outputs_unchanged(tok, world):
    m = tiny(tok, seed=1)
    images, qs, ans, _ = batch_of(world)
    px = m.preprocess(images)
    add_lora(m.janus.model.language_model, r=4, alpha=8, dropout=0.0)
    for p in m.parameters():  # make the LoRA do something
        if p.shape and p.requires_grad and p.dim() == 2 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        before = m.answer_loss(m.image_embeds(px), qs, ans)
        merge_lora(m.janus.model.language_model)
        after = m.answer_loss(m.image_embeds(px), qs, ans)
    assert not any("lora" in n for n, _ in m.named_parameters())
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_preprocessing_equals_transformers_processor(umm):
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
    proc = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 32, "width": 32})
    g = torch.Generator().manual_seed(0)
    for h, w in [(32, 32), (20, 40), (50, 30), (64, 64), (17, 96), (300, 200)]:
        im = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        ref = proc(images=[im.permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
        mine = umm.preprocess([im])
        assert mine.shape == ref.shape
        grey_levels = (mine - ref).abs() * 255 / 2  # normalised with mean = std = 0.5
        # PIL's fixed-point bicubic and torch's float one round a rare pixel to the neighbouring level
        assert grey_levels.max() <= 1.0 + 1e-4 and grey_levels.mean() <= 0.01, (h, w)


def test_generation_with_guidance_returns_valid_codes(umm):
    g = torch.Generator().manual_seed(0)
    codes = umm.generate_images(["a red circle on the left", "a blue square"], cfg_scale=5.0, temperature=1.0, generator=g)
    assert codes.shape == (2, umm.num_image_tokens) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < umm.codebook.shape[0]
    again = umm.generate_images(["a red circle on the left", "a blue square"], cfg_scale=5.0, temperature=1.0,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, again)
    # the token hook decides the fed-back token: a constant hook gives one code everywhere
    target = umm.codebook[7]
    hooked = umm.generate_images(["a red circle"], cfg_scale=5.0, temperature=0.0,
                                 token_hook=lambda v: target.expand_as(v))
    assert (hooked == 7).all()
    # guidance matters: cfg 1 (off) and cfg 5 give different greedy images for an untrained model
    assert not torch.equal(umm.generate_images(["a red circle"], cfg_scale=1.0, temperature=0.0),
                           umm.generate_images(["a red circle"], cfg_scale=5.0, temperature=0.0))


# ---- configurator.py / train.py ---------------------------------------------------------------

def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--batch_sise=8"], "unknown key 'batch_sise'; did you mean 'batch_size'"),
    (["--batch_size=eight"], "batch_size='eight': expected int, got str"),
    (["--game_over=1"], "unknown key 'game_over'"),
    (["--lr=True"], "lr=True: expected float, got bool"),
])
def test_configurator_rejects_bad_keys_and_types(args, message):
    r = run_train(*args, "--max_iters=0")
    assert r.returncode != 0
    assert message in r.stderr + r.stdout


def test_configurator_file_then_flags_override(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 3\nlr = 0.5\nout_dir = 'x'\n")
    code = ("import sys; sys.argv = ['train.py', %r, '--lr=2e-4', '--out_dir=123']\n"
            "batch_size = 32\nlr = 1e-3\nout_dir = 'out'\nexec(open('configurator.py').read())\n"
            "print(batch_size, lr, repr(out_dir))") % str(cfg)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert r.stdout.split() == ["3", "0.0002", "'123'"], r.stderr
