"""UniGame's tests: a specification, CPU only. Run with `python -m pytest -q test_unigame.py`."""

import functools
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DistributedSampler
from transformers import (CLIPConfig, CLIPModel, JanusConfig, JanusForConditionalGeneration, JanusProcessor, JanusVisionConfig,
                          JanusVQVAEConfig, LlamaConfig, LogitsProcessorList)
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

import checkpoint
import data
import eval as ev  # as ev: `eval` would shadow the builtin
import pictures
from buffer import HardBuffer, hardness, select_hard
from model import (ASSISTANT, BOI, EOI, IMAGE, JANUS_SYSTEM_PROMPT, UMM, USER, add_lora, build_tokenizer, clip_scorer,
                   load_perturber, merge_lora, save_perturber, tiny_config)
from perturber import Perturber, input_gradient, jitter, pgd_attack, pgd_refine, random_like, regularizer, swap_proposals, total_variation

HERE = os.path.dirname(os.path.abspath(__file__))

# A deprecation on our code paths fails the tests instead of scrolling by: a FutureWarning is how transformers
# and torch announce that an API we call will go (a keyword of LlamaModel.forward, ...), an error here and,
# through PYTHONWARNINGS, in the train.py, eval.py and bench.py runs the tests start; so is a DeprecationWarning
# raised at a line of our own modules.
OURS = "(bench|buffer|checkpoint|configurator|data|eval|model|perturber|pictures|ranks|train|test_unigame|__main__)$"
pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"), pytest.mark.filterwarnings(f"error::DeprecationWarning:{OURS}")]
os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), "error::FutureWarning") if w)


# ================================================================================================
# fixtures and helpers shared by the sections below: a tokenizer and a tiny model built here, the same
# model saved to disk (for train.py), and the shapes base shipped in assets/

def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def close(a, b, rtol=1e-5, atol=0.0):
    return torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=atol)


def token_norms(x):
    return x.double().norm(dim=-1)


@pytest.fixture(scope="module")
def train64():
    return data.shapes_world("train", 64, seed=0)


@pytest.fixture(scope="module")
def tok(train64):
    texts = [s["question"] for s in train64] + [s["caption"] for s in train64] + [s["answers"][0] for s in train64]
    return build_tokenizer(texts, 400)


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return UMM.from_config(tiny_config(tok, lm_width=64, lm_layers=2, vision_width=64, vision_layers=1), tok).eval()


@pytest.fixture(scope="module")
def umm(tok):
    return tiny(tok)


@pytest.fixture(scope="module")
def small_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "model"
    tiny(tok, seed=4).save_pretrained(str(path))
    return str(path)


SHAPES_BASE = os.path.join(HERE, "assets", "shapes-base")


@pytest.fixture(scope="module")
def shapes_base():
    return ev.load(SHAPES_BASE, "cpu")


# ================================================================================================
# data.py: the shapes world, its oracle, the real-data loaders, the loader

# ---------------------------------------------------------------- the shapes world

def reference_answer(question, attrs):
    """An independent reading of the templates; asserts the question names exactly one object."""
    objs = attrs["objects"]

    def only(pred):
        hits = [o for o in objs if pred(o)]
        assert len(hits) == 1, f"{question!r} names {len(hits)} objects in {objs}"
        return hits[0]

    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return only(lambda o: o["shape"] == m[1])["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return only(lambda o: o["color"] == m[1])["shape"]
    if m := re.fullmatch(r"where is the (\w+)\?", question):
        return only(lambda o: o["shape"] == m[1])["pos"]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    if question == "how many shapes are there?":
        return str(len(objs))
    raise AssertionError(f"unknown template: {question!r}")


@functools.lru_cache(maxsize=None)
def world(split, n, seed=0):
    """Shared between tests, which only read the samples."""
    return data.shapes_world(split, n, seed)


def objects(attrs):
    return sorted((o["color"], o["shape"], o["pos"]) for o in attrs["objects"])


def test_world_sample_format():
    for s in data.shapes_world("train", 20):
        assert set(s) == {"image", "question", "answers", "caption", "attrs", "source"}
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 32, 32)
        assert len(s["answers"]) == 1 and s["answers"][0] == s["answers"][0].lower()
        assert s["caption"] == data.caption(s["attrs"])
        assert re.fullmatch(r"shapes/train/\d+", s["source"])
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), data.render(s["attrs"]))


def test_world_is_deterministic_by_seed():
    a, b, c = data.shapes_world("train", 50, seed=0), data.shapes_world("train", 50, seed=0), data.shapes_world("train", 50, seed=1)
    assert all(torch.equal(x["image"], y["image"]) and x["question"] == y["question"] and x["attrs"] == y["attrs"] for x, y in zip(a, b))
    assert sum(torch.equal(x["image"], y["image"]) for x, y in zip(a, c)) < 5
    prefix = data.shapes_world("train", 10, seed=0)  # sample i does not depend on n
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(prefix, a))


def test_splits_draw_from_different_streams():
    train, test = data.shapes_world("train", 200), data.shapes_world("test", 200)
    assert sum(torch.equal(x["image"], y["image"]) for x, y in zip(train, test)) < 5
    train1 = data.shapes_world("train", 200, seed=1)  # (seed=1, train) is not (seed=0, test)
    assert sum(torch.equal(x["image"], y["image"]) for x, y in zip(train1, test)) < 5
    with pytest.raises(ValueError, match="unknown split"):
        data.shapes_world("val", 1)


def test_held_out_combos_only_in_ood():
    held = {f"{c} {s}" for c, s in data.HELD_OUT}
    for s in world("train", 2000) + world("test", 500, seed=3):
        assert not {(o["color"], o["shape"]) for o in s["attrs"]["objects"]} & set(data.HELD_OUT), s["attrs"]
        assert not any(h in s["question"] or h in s["caption"] for h in held), s["question"]
        assert s["attrs"]["background"] == "black" and s["attrs"]["noise"] == 0 and s["attrs"]["shift"] == "none"
    ood = world("ood", 600)
    seen_combos, backgrounds = set(), set()
    for s in ood:
        a = s["attrs"]
        combos = {(o["color"], o["shape"]) for o in a["objects"]} & set(data.HELD_OUT)
        assert bool(combos) == (a["shift"] == "combo"), a  # exactly one shift per ood sample
        assert (a["background"] != "black") == (a["shift"] == "background"), a
        assert (a["noise"] > 0) == (a["shift"] == "noise"), a
        seen_combos |= combos
        backgrounds.add(a["background"])
    assert seen_combos == set(data.HELD_OUT) and backgrounds == {"black", "gray", "navy"}


def test_questions_are_unambiguous_correct_and_balanced():
    samples = world("train", 2000) + world("ood", 600)
    kinds, yes_no = set(), []
    for s in samples:
        assert reference_answer(s["question"], s["attrs"]) == s["answers"][0], s
        kinds.add(s["question"].split()[1])
        if s["question"].startswith("is there"):
            yes_no.append(s["answers"][0] == "yes")
    assert kinds == {"color", "shape", "many", "there", "is"}  # all five templates occur
    assert 0.4 < np.mean(yes_no) < 0.6, np.mean(yes_no)


def test_caption_qa_agrees_with_attrs():
    answers = set()
    for s in world("test", 500) + world("ood", 600):
        qa = data.caption_qa(s["attrs"])
        assert len(qa) >= 4
        for q, a in qa:
            assert reference_answer(q, s["attrs"]) == a, (q, a, s["attrs"])
            answers.add(a)
        for o in s["attrs"]["objects"]:
            assert f"{o['color']} {o['shape']} {data.PHRASES[o['pos']]}" in s["caption"]
    assert {"yes", "no", "1", "2"} <= answers


def test_object_labels_name_each_objects_box_colour_and_shape():
    for s in world("train", 200) + world("ood", 60):
        objs, labels = s["attrs"]["objects"], data.object_labels(s["attrs"])
        assert len(labels) == len(objs)
        for o, ((x0, y0, x1, y1), c, k) in zip(objs, labels):
            assert (x0, y0, x1, y1) == (data.REGIONS[o["pos"]] if len(objs) == 2 else (0, 0, 32, 32))
            assert list(data.COLORS)[c] == o["color"] and data.SHAPES[k] == o["shape"]
            ys, xs = np.nonzero(data.shape_mask(o["shape"], o["cx"], o["cy"], o["size"]))  # the object lies in its box
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


def test_shapes_are_never_clipped_nor_touching():
    for s in world("train", 2000)[:1000]:
        masks = []
        for o in s["attrs"]["objects"]:
            assert 9 <= o["size"] <= 13
            assert 0 <= o["cx"] - o["size"] / 2 and o["cx"] + o["size"] / 2 <= 32
            assert 0 <= o["cy"] - o["size"] / 2 and o["cy"] + o["size"] / 2 <= 32
            masks.append(data.shape_mask(o["shape"], o["cx"], o["cy"], o["size"]))
        if len(masks) == 2:  # grow one by a pixel: still no contact
            m = masks[0].copy()
            m[1:] |= masks[0][:-1]; m[:-1] |= masks[0][1:]; m[:, 1:] |= masks[0][:, :-1]; m[:, :-1] |= masks[0][:, 1:]
            assert not (m & masks[1]).any(), s["attrs"]


# ---------------------------------------------------------------- the oracle

@pytest.mark.parametrize("split", ["test", "ood"])
def test_oracle_agrees_with_ground_truth(split):
    samples = world(split, 500)
    read = [data.read_attrs(s["image"]) for s in samples]
    agree = [objects(r) == objects(s["attrs"]) and r["background"] == s["attrs"]["background"] for r, s in zip(read, samples)]
    print(f"\noracle agreement on {split}: {np.mean(agree):.4f} of {len(agree)}")
    assert np.mean(agree) >= 0.99


def test_oracle_tolerates_reconstruction_error_and_ignores_off_palette_blobs():
    # a 3x3 binomial blur, roughly what a VQ decoder does to sharp edges
    k, agree = np.array([1, 2, 1]) / 4, []
    for s in world("test", 500)[:150] + world("ood", 600)[:150]:
        a = np.pad(s["image"].permute(1, 2, 0).numpy().astype(float), ((1, 1), (1, 1), (0, 0)), mode="edge")
        a = k[0] * a[:-2] + k[1] * a[1:-1] + k[2] * a[2:]
        a = k[0] * a[:, :-2] + k[1] * a[:, 1:-1] + k[2] * a[:, 2:]
        agree.append(objects(data.read_attrs(a.round().astype(np.uint8))) == objects(s["attrs"]))
    print(f"\noracle agreement on blurred images: {np.mean(agree):.4f} of {len(agree)}")
    assert np.mean(agree) >= 0.97
    s = next(s for s in world("test", 500) if [o["pos"] for o in s["attrs"]["objects"]] == ["left"])
    image = s["image"].clone()
    image[:, 24:31, 24:31] = 128  # a gray square is no palette colour: no object
    assert objects(data.read_attrs(image)) == objects(s["attrs"])


def test_oracle_score():
    s = data.shapes_world("test", 40)
    two = next(x for x in s if len(x["attrs"]["objects"]) == 2)
    img, attrs = two["image"], two["attrs"]
    assert data.oracle_score(img, attrs) == 1.0
    o = attrs["objects"][0]
    other_color = next(c for c in data.COLORS if c != o["color"])
    other_shape = next(sh for sh in data.SHAPES if sh not in (o["shape"], attrs["objects"][1]["shape"]))
    other_pos = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[o["pos"]]
    for change in ({"color": other_color}, {"shape": other_shape}, {"pos": other_pos}):
        wrong = {**attrs, "objects": [{**o, **change}, attrs["objects"][1]]}
        assert data.oracle_score(img, wrong) == 0.0, change
    assert data.oracle_score(img, {**attrs, "objects": attrs["objects"][:1]}) == 0.0  # count matters
    blank = torch.zeros(3, 32, 32, dtype=torch.uint8)
    assert data.oracle_score(blank, attrs) == 0.0 and data.read_attrs(blank)["objects"] == []
    # a caption's objects drawn at their canonical place are read back as they were asked for
    asked = {"objects": [{"color": "green", "shape": "triangle", "pos": "top"}, {"color": "red", "shape": "circle", "pos": "bottom"}],
             "background": "black"}
    assert data.oracle_score(torch.from_numpy(data.render(asked)).permute(2, 0, 1), asked) == 1.0
    with pytest.raises(TypeError):
        data.read_attrs(img.float() / 255)


# ---------------------------------------------------------------- real data: files written into tmp_path

def write_image(path, color=(200, 30, 30), size=(8, 6)):
    Image.new("RGB", size, color).save(path)
    return path


def write_vqav2(tmp, change=None, subtype="val2014"):
    """Three questions on three COCO-named images, ten answers each; change(questions, annotations)
    may spoil record 1."""
    (tmp / "images").mkdir()
    for i in (1, 2, 3):
        write_image(tmp / "images" / f"COCO_val2014_{i:012d}.jpg", (40 * i, 0, 0))
    questions = [{"image_id": i, "question": f"what is in image {i}?", "question_id": 10 * i} for i in (1, 2, 3)]
    annotations = [{"question_id": 10 * i, "image_id": i, "multiple_choice_answer": "a0",
                    "answers": [{"answer": f"a{j}", "answer_id": j + 1} for j in range(10)]} for i in (1, 2, 3)]
    if change:
        change(questions, annotations)
    q = {"questions": questions, **({"data_subtype": subtype} if subtype else {})}
    (tmp / "q.json").write_text(json.dumps(q))
    (tmp / "a.json").write_text(json.dumps({"annotations": annotations}))
    return str(tmp / "q.json"), str(tmp / "a.json"), str(tmp / "images")


@pytest.mark.parametrize("subtype", ["val2014", None])
def test_load_vqav2_keeps_ten_answers(tmp_path, subtype):
    records = data.load_vqav2(*write_vqav2(tmp_path, subtype=subtype))
    assert len(records) == 3
    r = records[1]
    assert r["answers"] == [f"a{j}" for j in range(10)]
    assert r["image"] == str(tmp_path / "images" / "COCO_val2014_000000000002.jpg")
    assert (r["question"], r["caption"], r["attrs"], r["source"]) == ("what is in image 2?", "", None, "q.json:1")
    image = data.Records(records)[1]["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 8)


def test_load_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png", (1, 2, 3))
    absolute = write_image(tmp_path / "b.png", (4, 5, 6))
    lines = [{"image": "img/a.png", "question": "q1?", "answers": ["x", "y"], "caption": "a cap"},
             {"image": str(absolute), "question": "q2?", "answers": ["z"]}]
    (tmp_path / "m.jsonl").write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    records = data.load_jsonl(str(tmp_path / "m.jsonl"))
    assert [r["source"] for r in records] == ["m.jsonl:1", "m.jsonl:3"]
    assert records[0]["image"] == str(tmp_path / "img" / "a.png") and records[1]["caption"] == ""
    assert records[0]["answers"] == ["x", "y"] and records[0]["caption"] == "a cap" and records[0]["attrs"] is None
    assert data.Records(records)[0]["image"][:, 0, 0].tolist() == [1, 2, 3]


GOOD = {"image": "ok.png", "question": "what?", "answers": ["this"]}
BAD_JSONL = {
    "missing image": (json.dumps({**GOOD, "image": "gone.png"}), "image file not found"),
    "empty question": (json.dumps({**GOOD, "question": "  "}), "empty question"),
    "empty answers": (json.dumps({**GOOD, "answers": []}), "non-empty list"),
    "malformed json": ('{"image": "ok.png", "question": ', "malformed JSON"),
    "unknown key": (json.dumps({**GOOD, "answer": "this"}), "unknown keys"),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_bad_jsonl_line(tmp_path, capsys, case):
    write_image(tmp_path / "ok.png")
    line, reason = BAD_JSONL[case]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), line, json.dumps(GOOD)]) + "\n")
    with pytest.raises(data.BadData, match=reason) as e:
        data.load_jsonl(str(path))
    assert f"{path} line 2" in str(e.value)
    before = len(data.skipped)
    records = data.load_jsonl(str(path), skip_bad=True)
    assert len(records) == 2 and [r["source"] for r in records] == ["m.jsonl:1", "m.jsonl:3"]
    assert data.skipped[before:] == [("m.jsonl:2", data.skipped[-1][1])] and reason in data.skipped[-1][1]
    out = capsys.readouterr().out
    assert "skipped 1 bad of 3" in out and "line 2" in out and out.count("\n") == 1


BAD_VQAV2 = {
    "missing image": (lambda q, a: q[1].update(image_id=99), "COCO_val2014_000000000099.jpg"),
    "empty question": (lambda q, a: q[1].update(question=""), "empty question"),
    "empty answers": (lambda q, a: a[1].update(answers=[]), "non-empty list"),
    "no annotation": (lambda q, a: a.pop(1), "no annotation"),
}


@pytest.mark.parametrize("case", BAD_VQAV2)
def test_bad_vqav2_record(tmp_path, capsys, case):
    change, reason = BAD_VQAV2[case]
    files = write_vqav2(tmp_path, change)
    with pytest.raises(data.BadData, match=reason) as e:
        data.load_vqav2(*files)
    assert f"{files[0]} record 1" in str(e.value)
    before = len(data.skipped)
    records = data.load_vqav2(*files, skip_bad=True)
    assert [r["source"] for r in records] == ["q.json:0", "q.json:2"]
    assert len(data.skipped) == before + 1 and data.skipped[-1][0] == "q.json:1"
    assert "skipped 1 bad of 3" in capsys.readouterr().out


def test_a_malformed_jsonl_line_is_named_once_with_the_column_where_parsing_failed(tmp_path):
    write_image(tmp_path / "ok.png")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"image": "ok.png" "question": "q?"}\n')
    with pytest.raises(data.BadData) as e:
        data.load_jsonl(str(path))
    assert str(e.value) == (f"{path} line 2: malformed JSON: Expecting ',' delimiter: column 20 "
                            "(skip_bad=True skips and counts such samples)")


def test_malformed_json_file_names_the_file(tmp_path):
    q, a, images = write_vqav2(tmp_path)
    (tmp_path / "a.json").write_text('{"annotations": [')
    with pytest.raises(data.BadData, match=re.escape(a)):
        data.load_vqav2(q, a, images, skip_bad=True)


def spoil(tmp_path):
    """A file that is no image, and two real images cut in half."""
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    rng = np.random.default_rng(0)
    for ext in ("png", "jpg"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"full.{ext}")
        b = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(b[: len(b) // 2])
    return [str(tmp_path / n) for n in ("garbage.jpg", "cut.png", "cut.jpg")]


def test_corrupt_images_raise_or_skip(tmp_path):
    for path in spoil(tmp_path):
        with pytest.raises(data.BadData, match=re.escape(path)):
            data.load_image(path)
        record = {"image": path, "question": "q?", "answers": ["a"], "caption": "", "attrs": None, "source": "m.jsonl:7"}
        with pytest.raises(data.BadData, match=re.escape(path)):
            data.Records([record])[0]
        marker = data.Records([record], skip_bad=True)[0]
        batch = data.collate([marker, data.shapes_world("train", 1)[0]])
        assert len(batch["images"]) == 1 and batch["sources"] == ["shapes/train/0"]
        assert batch["skipped"] == [("m.jsonl:7", marker["bad"])] and path in marker["bad"]


def two_questions_per_image(questions, annotations):
    """write_vqav2's change: a second question on each of its three images, answered at length."""
    for i in (1, 2, 3):
        questions.append({"image_id": i, "question": f"what is around image {i}?", "question_id": 10 * i + 1})
        annotations.append({"question_id": 10 * i + 1, "image_id": i, "answers": [{"answer": LONG_ANSWER, "answer_id": j + 1} for j in range(10)]})


LONG_ANSWER = "a red circle on the left and a blue square on the right"  # 13 tokens of the test tokenizer


def test_held_out_evaluation_takes_whole_images_out_of_training(tmp_path):
    records = data.load_vqav2(*write_vqav2(tmp_path, two_questions_per_image))
    training, evaluated, what = data.evaluation_records("vqav2", records, 2)
    assert len(evaluated) == 2 and len(training) == 4 and "2 held-out samples" in what and "keeps 4 of 6" in what
    assert {r["image"] for r in evaluated}.isdisjoint(r["image"] for r in training)  # both questions on its image are out
    assert sorted(r["source"] for r in training + evaluated) == sorted(r["source"] for r in records)
    assert data.evaluation_records("vqav2", records, 2)[1] == evaluated  # the same slice in every run
    # one held-out sample asked for: its image's other question is held out too, unused
    training, evaluated, _ = data.evaluation_records("vqav2", records, 1)
    assert len(evaluated) == 1 and len(training) == 4
    # the world evaluates on its own test split; VQAv2's val files when given, all their questions, none trained on
    assert data.evaluation_records("shapes", records, 3)[1][0]["source"] == "shapes/test/0"
    (tmp_path / "val").mkdir()
    val = write_vqav2(tmp_path / "val")
    training, evaluated, what = data.evaluation_records("vqav2", records, 5, False, *val)
    assert training == records and [r["source"] for r in evaluated] == ["q.json:0", "q.json:1", "q.json:2"] and val[0] in what


def test_an_unreadable_evaluation_image_stops_named_or_is_skipped_and_reported(tmp_path, capsys):
    records = data.load_vqav2(*write_vqav2(tmp_path))
    corrupt = spoil(tmp_path)[1]
    records[1]["image"] = corrupt  # question 1's image is cut in half
    with pytest.raises(data.BadData) as e:
        data.readable(records, 3)
    assert re.fullmatch(rf"q\.json record 1: {re.escape(corrupt)}: cannot decode image \(.*\) \(skip_bad=True skips and counts such samples\)",
                        str(e.value)), str(e.value)
    before = len(data.skipped)
    assert [r["source"] for r in data.readable(records, 2, skip_bad=True)] == ["q.json:0", "q.json:2"]  # the next readable one
    assert data.skipped[before:] == [("q.json:1", data.skipped[-1][1])] and corrupt in data.skipped[-1][1]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "left 1 unreadable image out of evaluation (q.json record 1:" in out


def test_skips_are_reported_in_words_as_distinct_samples_and_how_often_they_were_met():
    met = [("m.jsonl:14", "/d/05.png: cannot decode image"), ("m.jsonl:15", "/d/06.png: cannot decode image")] * 8
    assert data.describe_skips(met, "in training") == ("skipped 2 bad samples in training, met 16 times in all: m.jsonl line 14, "
                                                       "m.jsonl line 15 (first: /d/05.png: cannot decode image)")
    assert data.describe_skips(met[:1], "when reading the data") == \
        "skipped 1 bad sample when reading the data: m.jsonl line 14 (first: /d/05.png: cannot decode image)"
    many = [(f"q.json:{i}", "no annotation") for i in range(5)]
    assert data.describe_skips(many, "x").startswith("skipped 5 bad samples x: q.json record 0, q.json record 1, q.json record 2 and 2 more")
    assert data.describe_skips([], "in training") == ""


def decode(tmp_path, im, name, **save):
    im.save(tmp_path / name, **save)
    return data.load_image(str(tmp_path / name)).permute(1, 2, 0).reshape(-1, 3).tolist()


def test_decode_modes_to_rgb(tmp_path):
    assert decode(tmp_path, Image.new("L", (2, 1), 100), "l.png") == [[100, 100, 100]] * 2
    assert decode(tmp_path, Image.new("L", (2, 1), 100), "l.jpg") == [[100, 100, 100]] * 2
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 7])
    p.putpixel((1, 0), 1), p.putpixel((2, 0), 2)
    assert decode(tmp_path, p, "p.png") == [[0, 0, 0], [10, 200, 30], [250, 5, 7]]
    assert decode(tmp_path, p, "pt.png", transparency=0) == [[255, 255, 255], [10, 200, 30], [250, 5, 7]]  # over white
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], np.uint8)
    assert decode(tmp_path, Image.fromarray(rgba), "rgba.png") == [[255, 255, 255], [255, 0, 0], [127, 127, 255]]
    la = np.array([[[0, 0], [0, 255], [100, 255]]], np.uint8)
    assert decode(tmp_path, Image.fromarray(la, "LA"), "la.png") == [[255, 255, 255], [0, 0, 0], [100, 100, 100]]
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((0, 0), (0, 255, 255, 0)), cmyk.putpixel((1, 0), (0, 0, 0, 255))
    assert decode(tmp_path, cmyk, "cmyk.tif") == [[255, 0, 0], [0, 0, 0], [255, 255, 255]]
    deep = Image.fromarray(np.array([[0, 1000, 32896, 65535]], np.uint16))
    assert deep.mode == "I;16"
    assert decode(tmp_path, deep, "deep.png") == [[0, 0, 0], [4, 4, 4], [128, 128, 128], [255, 255, 255]]  # scaled, not clipped
    rgb = np.array([[[1, 2, 3], [250, 128, 0]]], np.uint8)
    assert decode(tmp_path, Image.fromarray(rgb), "rgb.png") == [[1, 2, 3], [250, 128, 0]]


# ---------------------------------------------------------------- the loader

def test_loader_with_workers_reports_each_skip_once(tmp_path):
    lines = [{"image": str(write_image(tmp_path / f"{i}.png", (i, i, i))), "question": f"q{i}?", "answers": ["a"]} for i in range(7)]
    lines.insert(3, {"image": spoil(tmp_path)[1], "question": "q?", "answers": ["a"]})  # parses, fails to decode
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    dataset = data.make_dataset("jsonl", path=str(tmp_path / "m.jsonl"), skip_bad=True)
    loader = data.make_loader(dataset, batch_size=3, num_workers=2, drop_last=False)
    batches = list(loader)
    assert sum(len(b["skipped"]) for b in batches) == 1
    assert [s for b in batches for s, _ in b["skipped"]] == ["m.jsonl:4"]
    sources = [s for b in batches for s in b["sources"]]
    assert len(sources) == 7 and len(set(sources)) == 7
    assert all(im.dtype == torch.uint8 and im.shape == (3, 6, 8) for b in batches for im in b["images"])


def epoch_sources(loader, n_epochs=2):
    batches = data.infinite_batches(loader)
    return [[s for _ in range(len(loader)) for s in next(batches)["sources"]] for _ in range(n_epochs)]


def test_loader_shuffles_by_seed():
    dataset = data.make_dataset("shapes", "train", n=24)
    a = epoch_sources(data.make_loader(dataset, 4, seed=0))
    b = epoch_sources(data.make_loader(dataset, 4, seed=0))
    c = epoch_sources(data.make_loader(dataset, 4, seed=1))
    assert a == b and a[0] != c[0] and a[0] != a[1]  # seeded, and reshuffled every epoch
    assert sorted(a[0]) == sorted(s["source"] for s in dataset.records)
    assert epoch_sources(data.make_loader(dataset, 4, shuffle=False), 1)[0] == [f"shapes/train/{i}" for i in range(24)]
    with pytest.raises(ValueError, match="no batches"):
        next(data.infinite_batches(data.make_loader(dataset, 32)))


def test_distributed_ranks_get_disjoint_shards_reshuffled_per_epoch(monkeypatch):
    dataset = data.make_dataset("shapes", "train", n=21)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        loader = data.make_loader(dataset, batch_size=2, seed=0)
        assert isinstance(loader.sampler, DistributedSampler)
        shards.append(epoch_sources(loader))
    (r0e0, r0e1), (r1e0, r1e1) = shards
    assert len(r0e0) == len(r1e0) == 10 and not set(r0e0) & set(r1e0)  # 21 -> 10 each, drop_last
    assert not set(r0e1) & set(r1e1) and r0e0 != r0e1  # set_epoch reshuffles


def test_loader_under_a_real_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        loader = data.make_loader(data.make_dataset("shapes", "train", n=8), batch_size=4)
        assert isinstance(loader.sampler, DistributedSampler)
        first, second = epoch_sources(loader)
        assert sorted(first) == sorted(second) and first != second
    finally:
        torch.distributed.destroy_process_group()


def test_make_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.make_dataset("coco")
    with pytest.raises(ValueError, match="no paths"):
        data.make_dataset("shapes", path="x.jsonl")


# ================================================================================================
# model.py: the UMM adapter over Janus, projection onto the codebook, LoRA, preprocessing, generation, the CLIP
# scorer, and parity with transformers' Janus-Pro

def batch_of(samples, n=4):
    s = samples[:n]
    return [r["image"] for r in s], [r["question"] for r in s], [r["answers"][0] for r in s], [r["caption"] for r in s]


# ---------------------------------------------------------------- the adapter

def test_save_and_reload_gives_identical_outputs(umm, train64, tmp_path):
    images, qs, ans, caps = batch_of(train64)
    px = umm.preprocess(images)
    umm.save_pretrained(tmp_path / "m")
    again = UMM.from_pretrained(str(tmp_path / "m")).eval()
    with torch.no_grad():
        assert torch.equal(umm.answer_loss(umm.image_embeds(px), qs, ans), again.answer_loss(again.image_embeds(px), qs, ans))
        codes = umm.image_codes(px)
        assert torch.equal(codes, again.image_codes(px))
        assert torch.equal(umm.image_loss(caps, codes), again.image_loss(caps, codes))
    # and transformers alone can load it
    JanusForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_understanding_logits_equal_janus_forward(umm, train64):
    images, qs, ans, _ = batch_of(train64, 1)
    px = umm.preprocess(images)
    ids = torch.tensor([umm.prompt_ids(qs[0]) + umm.answer_ids(ans[0])])
    assert (ids == umm.image_id).sum() == umm.num_image_tokens
    with torch.no_grad():
        ref = umm.janus(input_ids=ids, pixel_values=px).logits
        mine, labels = umm.answer_logits(umm.image_embeds(px), qs, ans)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_answer_loss_is_masked_cross_entropy_and_padding_invariant(umm, train64):
    images, qs, ans, _ = batch_of(train64)
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


def test_prompt_ids_equal_tokenizing_every_image_placeholder(umm, train64):
    questions = [s["question"] for s in train64] + ["  odd <image_placeholder> spacing ", "", "ünï 🚀\nline"]
    for system in ("", JANUS_SYSTEM_PROMPT):
        for q in questions:
            text = f"{system}{USER}: {BOI + IMAGE * umm.num_image_tokens + EOI}\n{q.strip()}\n\n{ASSISTANT}:"
            want = umm.tokenizer(text).input_ids
            old, umm.system_prompt = umm.system_prompt, system
            try:
                assert umm.prompt_ids(q) == want, q
            finally:
                umm.system_prompt = old


# ---------------------------------------------------------------- projection onto the codebook

def test_projection_lands_on_codebook_and_passes_gradient(umm, train64):
    px = umm.preprocess(batch_of(train64)[0])
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


def test_under_bf16_autocast_the_projection_still_picks_the_nearest_code_in_float32(umm):
    """bf16's 8-bit mantissa ties or swaps neighbouring codes' cosines; the choice of code is made in float32 whatever
    the autocast, so a bf16 run plays the game on the same codes a float32 one would."""
    z = torch.randn(8, 64, umm.codebook.shape[1], generator=gen(3))
    codes = umm.project_to_codebook(z)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq, codes_bf16 = umm.project_to_codebook(z)
        in_bf16 = (F.normalize(z, dim=-1) @ umm.codebook.t()).argmax(-1)  # what the choice would be in bf16
    assert torch.equal(codes_bf16, codes)
    assert not torch.equal(in_bf16, codes)  # this batch is one where bf16 would choose other codes
    torch.testing.assert_close(zq.float(), umm.codebook[codes], rtol=0, atol=1e-2)


def test_aligner_hard_samples_are_embedded_under_bf16_autocast_as_in_float32(umm, train64):
    """perturb_at='aligner' buffers an image and its delta (float16); step 6 re-embeds them under train.py's autocast,
    which on CPU refused to stack float16 deltas until they were stacked in float32."""
    images = batch_of(train64)[0]
    deltas = 0.1 * torch.randn(len(images), umm.num_image_tokens, umm.token_dim("aligner"), generator=gen(5))
    items = [{"image": im, "delta": d.half()} for im, d in zip(images, deltas)]
    with torch.no_grad():
        ref = umm.buffered_embeds(items)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = umm.buffered_embeds(items)
    torch.testing.assert_close(ref, umm.image_embeds(umm.preprocess(images)) + deltas.half().float())
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)  # bf16 rounding of the vision tower and aligner


# ---------------------------------------------------------------- LoRA

def test_lora_merge_leaves_outputs_unchanged(tok, train64):
    m = tiny(tok, seed=1)
    images, qs, ans, _ = batch_of(train64)
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


# 16-bit frozen weights under float32 LoRA (load_dtype)
def test_lora_on_a_bfloat16_base_trains_in_float32_and_merges():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    lora = add_lora(base, r=4, alpha=8, dropout=0.0, targets=("0",))
    assert all(p.dtype == torch.float32 for p in lora)  # AdamW steps of 1e-6 would vanish in bfloat16
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = base(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert lora[1].grad is not None and lora[1].grad.abs().sum() > 0  # B gets a gradient at B = 0
    with torch.no_grad():
        lora[1].normal_()
    expected = base(x).float()
    merge_lora(base)
    assert isinstance(base[0], nn.Linear) and base[0].weight.dtype == torch.bfloat16
    assert torch.allclose(base(x).float(), expected, atol=0.1, rtol=0.02)


def test_gradient_checkpointing_keeps_the_lora_gradients(tok, train64):
    """The 7B configuration checkpoints the LM; LoRA on a frozen LM must still get the same gradients."""
    m = tiny(tok, seed=6)
    lora = add_lora(m.janus.model.language_model, r=4, alpha=8, dropout=0.0)
    for p in lora[1::2]:
        torch.nn.init.normal_(p, std=0.05)
    m.requires_grad_(False)
    for p in lora:
        p.requires_grad_(True)
    images, qs, ans, _ = batch_of(train64)
    px = m.preprocess(images)

    def grads():
        return torch.autograd.grad(m.answer_loss(m.image_embeds(px), qs, ans).mean(), lora)
    m.train()
    plain = grads()
    m.gradient_checkpointing_enable()
    checkpointed = grads()
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_training_mode_without_dropout_is_deterministic_and_keeps_gradient_checkpointing(tok, train64):
    """train.py's opponent passes: umm.train(dropout=False) turns LoRA's dropout off, not training mode."""
    m = tiny(tok, seed=7)
    lora = add_lora(m.janus.model.language_model, r=4, alpha=8, dropout=0.5)
    for p in lora[1::2]:
        torch.nn.init.normal_(p, std=0.05)
    images, qs, ans, _ = batch_of(train64)
    px = m.preprocess(images)
    with torch.no_grad():
        def loss():
            return m.answer_loss(m.image_embeds(px), qs, ans)
        m.train()
        assert not torch.equal(loss(), loss())  # dropout draws differ
        m.train(dropout=False)
        noiseless = loss()
        assert m.training and m.janus.model.language_model.training and torch.equal(noiseless, loss())
        m.eval()
        torch.testing.assert_close(noiseless, loss())  # as in evaluation
        m.train()
        assert all(d.training for d in m.modules() if isinstance(d, nn.Dropout))


# ---------------------------------------------------------------- preprocessing

def test_preprocessing_equals_transformers_processor(umm):
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


# ---------------------------------------------------------------- generation

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


def test_generated_view_steers_the_drawn_tokens_at_vq_and_stores_the_delta_at_the_aligner(umm):
    prompts = ["a red circle", "a blue square"]
    target = umm.codebook[7]
    embeds, pixels, store = umm.generated_view(prompts, "vq", steer=lambda v: target - v, temperature=0.0)
    assert (store["codes"] == 7).all()  # the steer moved every drawn token onto entry 7
    assert torch.allclose(embeds, umm.image_embeds(umm.decode_codes(store["codes"]).clamp(-1, 1)))
    step = lambda e: torch.full_like(e, 0.01)
    embeds, pixels, store = umm.generated_view(prompts, "aligner", steer=step, temperature=0.0)
    clean = umm.image_embeds(pixels)
    assert torch.allclose(embeds - clean, torch.full_like(clean, 0.01), atol=1e-5) and store["delta"].dtype == torch.float16
    assert torch.equal(store["image"], umm.to_uint8(pixels))


def test_static_and_dynamic_kv_cache_generate_the_same_codes(tok):
    m = tiny(tok, seed=5)
    caps = ["a red circle on the left", "two shapes: a blue square and a green triangle", "a yellow triangle"]
    for cfg, temp, hook in [(5.0, 1.0, None), (1.0, 0.0, None), (1.0, 1.0, lambda v: v + 0.3 * torch.randn_like(v))]:
        codes = []
        for static in (False, True):
            torch.manual_seed(0)  # the hook's noise
            codes.append(m.generate_images(caps, cfg, temp, generator=gen(1), token_hook=hook, static_cache=static))
        assert torch.equal(codes[0], codes[1]), (cfg, temp)
    # a second call reuses the kept static cache, reset
    assert torch.equal(m.generate_images(caps, 5.0, 1.0, generator=gen(1), static_cache=True),
                       m.generate_images(caps, 5.0, 1.0, generator=gen(1), static_cache=False))


def test_generation_is_inference_even_in_train_mode_with_gradient_checkpointing(tok):
    m = tiny(tok, seed=6)
    caps = ["a red circle on the left", "a blue square"]
    for p in add_lora(m.janus.model.language_model, r=4, alpha=8, dropout=0.5):
        torch.nn.init.normal_(p, std=0.1)  # a LoRA that matters, so its dropout would change the codes in train mode
    want = m.generate_images(caps, 5.0, 0.0)  # eval mode
    m.gradient_checkpointing_enable()  # in train mode this would drop the KV cache
    m.train()
    m.janus.model.vqmodel.eval()
    for static in (False, True):
        assert torch.equal(m.generate_images(caps, 5.0, 0.0, static_cache=static), want)
    assert m.training and m.janus.model.language_model.training and not m.janus.model.vqmodel.training  # modes restored


# ---------------------------------------------------------------- the CLIP scorer

def save_tiny_clip(tok, path):
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=40, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(path)
    tok.save_pretrained(path)
    return clip


@pytest.fixture(scope="module")
def clip_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    save_tiny_clip(tok, path)
    return str(path)


def test_clip_scorer_from_a_local_directory_matches_clip_forward(tok, tmp_path):
    clip = save_tiny_clip(tok, tmp_path)
    score = clip_scorer(str(tmp_path))
    images = torch.rand(3, 3, 32, 32)
    texts = ["a red circle on the left", "a blue square", "what color is the circle? red"]
    s = score(images, texts)
    assert s.shape == (3,) and (s.abs() <= 1 + 1e-6).all()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    t = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=(images - mean) / std)
    torch.testing.assert_close(s, out.logits_per_image.diagonal() / clip.logit_scale.exp(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- Janus-Pro parity and export
# Random-initialised models with Janus-Pro's layout at CPU widths, and a tokenizer with Janus-Pro's
# special tokens, checked against what transformers' own Janus classes do with them.

# The chat template that the converted Janus-Pro checkpoints ship (chat_template.jinja), as written by
# transformers' models/janus/convert_janus_weights_to_hf.py.
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: "
    "{%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}{%endif%}"
    "{%endif%}{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}")


def janus_pro_layout(tok, image_size=384, seed=0):
    """Janus-Pro's architecture, narrow: SigLIP on 16-pixel patches with a depth-2 aligner, LLaMA LM, a VQ
    model that downsamples 16x (channel multipliers 1,1,2,2,4) onto a 16384 x 8 codebook, generation
    head / embeddings / aligner; at 384 px that is Janus-Pro's 24 x 24 = 576 image tokens. Only the widths
    and depths are cut (LM 64 x 2, SigLIP 32 x 1, VQ 32 channels)."""
    W = 64
    text = LlamaConfig(vocab_size=len(tok), hidden_size=W, intermediate_size=2 * W, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                               patch_size=16, projection_dim=W, num_image_tokens=(image_size // 16) ** 2)
    vq = JanusVQVAEConfig(base_channels=32, latent_channels=32, num_res_blocks=1, projection_dim=W, image_token_embed_dim=W)
    torch.manual_seed(seed)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    return UMM.from_config(cfg, tok).eval()


def janus_processor(tok, image_size=384, system_prompt=True, **image_kw):
    """transformers' JanusProcessor as a converted Janus-Pro directory sets it up: the pillow image processor
    with Janus-Pro's mean = std = 0.5, the chat template, and the default system prompt."""
    images = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": image_size, "width": image_size},
                                    **image_kw)
    return JanusProcessor(images, tok, chat_template=JANUS_CHAT_TEMPLATE, use_default_system_prompt=system_prompt,
                          num_image_tokens=(image_size // 16) ** 2)


def chat(text, answer=None, image=True):
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    turns = [{"role": "user", "content": user}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


@pytest.fixture(scope="module")
def pro384(tok):
    return janus_pro_layout(tok, 384)


@pytest.fixture(scope="module")
def pro128(tok):
    return janus_pro_layout(tok, 128)  # 8 x 8 = 64 image tokens: generation at CPU speed


@pytest.mark.parametrize("system_prompt", [True, False])
def test_understanding_prompt_equals_janus_processor_and_chat_template(tok, pro384, system_prompt):
    proc = janus_processor(tok, system_prompt=system_prompt)
    umm = UMM(pro384.janus, tok, system_prompt=JANUS_SYSTEM_PROMPT if system_prompt else "")
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    for q, a in [("what color is the circle?", "red"), ("how many shapes are there?  ", "2"), ("Is it a dog?", "no")]:
        prompt = proc.apply_chat_template(chat(q), add_generation_prompt=True)
        ids = proc(text=prompt, images=[image]).input_ids[0].tolist()
        assert umm.prompt_ids(q) == ids
        assert ids.count(umm.image_id) == 576 and (JANUS_SYSTEM_PROMPT in tok.decode(ids)) == system_prompt
        # a training sequence: the template's assistant turn, closed by EOS as Janus-Pro's SFT format does
        full = proc(text=proc.apply_chat_template(chat(q, a)), images=[image]).input_ids[0].tolist()
        assert umm.prompt_ids(q) + umm.answer_ids(a) == full + [umm.eos_id]


SUFFIX = "Answer the question using a single word or phrase."  # the Janus-Pro configs' prompt_suffix


def test_the_prompt_suffix_sits_where_the_chat_template_puts_it(tok, pro384, tmp_path):
    """LLaVA-style VQA prompts: the user's text is the question, a newline and the suffix (lmms-eval's VQAv2
    prompt), laid out by the processor's chat template, in training sequences as in prompts."""
    proc = janus_processor(tok)
    umm = UMM(pro384.janus, tok, system_prompt=JANUS_SYSTEM_PROMPT)
    umm.prompt_suffix = SUFFIX
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    questions = [r["question"] for r in data.load_vqav2(*write_vqav2(tmp_path, two_questions_per_image))]
    for q in questions + ["how many shapes are there?  "]:
        prompt = proc.apply_chat_template(chat(f"{q}\n{SUFFIX}"), add_generation_prompt=True)
        assert umm.prompt_ids(q) == proc(text=prompt, images=[image]).input_ids[0].tolist()
        full = proc(text=proc.apply_chat_template(chat(f"{q}\n{SUFFIX}", "a0")), images=[image]).input_ids[0].tolist()
        assert umm.prompt_ids(q) + umm.answer_ids("a0") == full + [umm.eos_id]
    text = tok.decode(umm.prompt_ids(questions[0]))
    assert text.index(f"{questions[0]}\n{SUFFIX}") < text.index(ASSISTANT)
    umm.prompt_suffix = ""
    assert SUFFIX not in tok.decode(umm.prompt_ids(questions[0]))


def test_a_long_answer_is_not_cut(tok, tmp_path):
    """VQAv2's answers can run past 8 tokens: a tiny Janus taught one answer of 13 tokens on VQAv2-layout files
    gives it whole under the default cap (answer_tokens, 16), and scores 1; a cap of 8 would cut it."""
    record = data.load_vqav2(*write_vqav2(tmp_path, two_questions_per_image))[3]  # image 1's second question
    assert record["answers"] == [LONG_ANSWER] * 10
    umm = tiny(tok, seed=1)
    umm.prompt_suffix = SUFFIX
    assert len(umm.answer_ids(LONG_ANSWER)) - 1 == 13  # without EOS
    px = umm.preprocess([data.load_image(record["image"])])
    opt = torch.optim.Adam(umm.parameters(), lr=3e-3)
    for _ in range(60):
        loss = umm.answer_loss(umm.image_embeds(px), [record["question"]], [LONG_ANSWER]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        emb = umm.image_embeds(px)
    assert umm.answer(emb, [record["question"]]) == [LONG_ANSWER]
    assert ev.understanding_accuracy(umm, [record], progress=False) == 1.0
    assert umm.answer(emb, [record["question"]], max_new_tokens=8) == [" ".join(LONG_ANSWER.split()[:8])]


def test_generation_prompt_equals_janus_processor_in_image_mode(tok, pro384):
    proc = janus_processor(tok)  # the system prompt is for understanding only
    for caption in ["a red circle on the left", "two blue squares "]:
        prompt = proc.apply_chat_template(chat(caption, image=False), add_generation_prompt=True)
        assert pro384.generation_prompt_ids(caption) == proc(text=prompt, generation_mode="image").input_ids[0].tolist()


def test_from_pretrained_reads_a_transformers_5_processor_config(tok, pro128, tmp_path):
    """transformers 5 saves the image processor inside processor_config.json, with no preprocessor_config.json."""
    pro128.save_pretrained(tmp_path)
    os.remove(tmp_path / "preprocessor_config.json")
    os.remove(tmp_path / "processor_config.json")
    janus_processor(tok, 128, min_size=20).save_pretrained(tmp_path)
    assert "image_processor" in json.load(open(tmp_path / "processor_config.json"))
    umm = UMM.from_pretrained(str(tmp_path))
    assert (umm.system_prompt, umm.image_mean, umm.image_std, umm.min_size) == (JANUS_SYSTEM_PROMPT, 0.5, 0.5, 20)


def test_preprocessing_at_janus_pro_384_equals_its_image_processor(tok, pro384):
    proc = janus_processor(tok)
    g = torch.Generator().manual_seed(0)
    for h, w in [(384, 384), (480, 640), (640, 427), (300, 200), (100, 1000), (24, 24)]:
        im = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        ref = proc.image_processor(images=[im.permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
        mine = pro384.preprocess([im])
        assert mine.shape == ref.shape == (1, 3, 384, 384)
        grey_levels = (mine - ref).abs() * 255 / 2
        # PIL's fixed-point bicubic and torch's float one round a rare pixel to the neighbouring level;
        # the padding (mean colour) and its placement must agree exactly
        assert grey_levels.max() <= 1.0 + 1e-4 and grey_levels.mean() <= 0.01, (h, w)


class _NoGuidance:
    """transformers' image generate always runs the conditional and the unconditional prompt together and,
    at guidance_scale 1, never drops the second half (a shape error in 5.23). Keeping the conditional
    half's logits is what no guidance means."""

    def __call__(self, input_ids, scores):
        return scores[: scores.shape[0] // 2]


@pytest.mark.parametrize("cfg, temperature", [(5.0, 1.0), (5.0, 0.0), (3.0, 0.7), (1.0, 1.0), (1.0, 0.0)])
def test_image_generation_equals_transformers_generate(tok, pro128, cfg, temperature):
    proc = janus_processor(tok, 128)
    captions = ["a red circle on the left", "a big blue square at the top right"]  # different lengths: left padding
    inputs = proc(text=[proc.apply_chat_template(chat(c, image=False), add_generation_prompt=True) for c in captions],
                  generation_mode="image", padding=True)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature else dict(do_sample=False)
    extra = dict(logits_processor=LogitsProcessorList([_NoGuidance()])) if cfg == 1.0 else {}
    torch.manual_seed(1)
    ref = pro128.janus.generate(inputs.input_ids, attention_mask=inputs.attention_mask, generation_mode="image",
                                guidance_scale=cfg, **sampling, **extra)
    torch.manual_seed(1)  # both draw from the global generator, one multinomial per step over the guided logits
    mine = pro128.generate_images(captions, cfg_scale=cfg, temperature=temperature)
    assert mine.shape == ref.shape == (2, 64)
    assert torch.equal(mine, ref), f"{(mine != ref).sum().item()} of {mine.numel()} codes differ"
    assert len(set(mine.flatten().tolist())) > 4  # not a degenerate, constant image


def test_export_round_trips_merged_model_and_perturber(tok, train64, tmp_path):
    umm = janus_pro_layout(tok, 128, seed=5)
    add_lora(umm.janus.model.language_model, r=4, alpha=8, dropout=0.05)
    for n, p in umm.named_parameters():  # a LoRA that changes the outputs
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    umm.eval()
    images, qs, ans, _ = batch_of(train64, 1)
    px = umm.preprocess(images)
    perturber = Perturber(umm.janus.config.text_config.hidden_size, eps_max=0.02, eps_init=0.01, relative=False)
    with torch.no_grad():
        perturber.theta_eps.fill_(0.7)  # a learned budget, away from eps_init
    umm.save_pretrained(tmp_path)
    save_perturber(perturber, tmp_path, perturb_at="aligner")

    merged = JanusForConditionalGeneration.from_pretrained(tmp_path).eval()  # no UniGame code
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([umm.prompt_ids(qs[0]) + umm.answer_ids(ans[0])])
    with torch.no_grad():
        logits, _ = umm.answer_logits(umm.image_embeds(px), qs, ans)
        torch.testing.assert_close(merged(input_ids=ids, pixel_values=px).logits, logits, rtol=1e-4, atol=1e-4)
    # image generation too, with the begin-of-image id read from the saved generation config
    prompt = torch.tensor([umm.generation_prompt_ids("a red circle")])
    ref = merged.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", guidance_scale=5.0,
                          do_sample=False)
    assert torch.equal(umm.generate_images(["a red circle"], cfg_scale=5.0, temperature=0.0), ref)

    again, meta = load_perturber(str(tmp_path))
    assert meta == {"dim": 64, "hidden": 32, "eps_min": 0.0, "eps_max": 0.02, "eps_init": 0.01, "relative": False, "sees": "token",
                    "eps": pytest.approx(perturber.eps.item()), "perturb_at": "aligner"}
    with torch.no_grad():
        z = umm.visual_tokens(px, "aligner")
        assert torch.equal(again(z), perturber(z)) and torch.equal(again.eps, perturber.eps)


# ================================================================================================
# perturber.py: the perturbation and its budget, the regulariser, random and PGD deltas

# ---------------------------------------------------------------- the budget

@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_delta_norm_is_eps_times_token_norm_at_any_scale(scale):
    torch.manual_seed(0)
    p = Perturber(dim=32)
    z = scale * torch.randn(3, 16, 32)
    z[0, 5] = 0.0  # an all-zero token
    delta = p(z)
    assert delta.shape == z.shape and delta.dtype == z.dtype
    assert torch.isfinite(delta).all()
    want = p.eps.item() * token_norms(z)
    assert close(token_norms(delta), want)
    assert delta[0, 5].abs().max() == 0


def test_absolute_budget_gives_delta_of_length_eps_whatever_z():
    torch.manual_seed(0)
    p = Perturber(dim=32, relative=False, eps_init=0.015)
    z = torch.cat([1e-4 * torch.randn(4, 32), 1e4 * torch.randn(4, 32), torch.zeros(1, 32)])
    n = token_norms(p(z))
    assert close(n, torch.full_like(n, 0.015))


def test_noise_gives_distinct_draws_all_exactly_in_budget():
    torch.manual_seed(0)
    p = Perturber(dim=32)
    z = torch.randn(8, 32)
    clean = p(z)
    draws = [p(z, noise_std=0.3, generator=gen(s)) for s in range(3)]
    for d in draws:
        assert close(token_norms(d), p.eps.item() * token_norms(z))
        cos = torch.cosine_similarity(d, clean, dim=-1)
        assert (cos < 0.9999).all() and (cos > 0.9).all()  # varied, yet still near the learned direction
    assert not torch.allclose(draws[0], draws[1])
    assert torch.equal(p(z, noise_std=0.3, generator=gen(0)), draws[0])  # seeded draws repeat


def test_eps_starts_at_eps_init_and_stays_bounded_under_large_steps():
    for sign in (+1, -1):  # push ε up hard, or down hard
        p = Perturber(dim=16, eps_min=0.001, eps_max=0.02, eps_init=0.01)
        assert math.isclose(p.eps.item(), 0.01, rel_tol=1e-6)
        for _ in range(5):  # plain SGD steps of lr 1e4: θ_ε moves by about ±50 at once
            (grad,) = torch.autograd.grad(sign * p.eps, p.theta_eps)
            with torch.no_grad():
                p.theta_eps += 1e4 * grad
            assert 0.001 <= p.eps.item() <= 0.02
        assert math.isclose(p.eps.item(), 0.02 if sign > 0 else 0.001, rel_tol=1e-3)


def test_eps_init_outside_the_range_is_rejected():
    with pytest.raises(ValueError):
        Perturber(dim=8, eps_min=0.0, eps_max=0.02, eps_init=0.02)


@pytest.mark.parametrize("sees", ["token", "grad+noise+context"])
def test_gradients_reach_every_perturber_parameter(sees):
    torch.manual_seed(0)
    p = Perturber(dim=16, sees=sees, question_dim=64, tokens=9)
    z = torch.randn(2, 9, 16)
    delta = p(z, **perturber_inputs(p, z))
    ((z + delta) ** 3).sum().backward()
    for name, param in p.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_last_layer_is_orthogonal_and_bias_free():
    for dim, hidden in [(256, None), (8, None), (16, 16)]:
        last = Perturber(dim=dim, hidden=hidden).net[-1]
        assert last.bias is None
        W = last.weight.double()
        gram = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T  # orthonormal columns or rows
        assert close(gram, torch.eye(gram.shape[0]), rtol=0.0, atol=1e-5)


def test_a_perturber_that_sees_the_gradient_aims_with_it_and_keeps_the_budget():
    torch.manual_seed(0)
    z, w = torch.randn(2, 9, 16), torch.randn(16)
    with torch.no_grad():  # input_gradient works where the caller has gradients off, as eval does
        g = input_gradient(lambda t: (t * w).sum((-2, -1)), z)
    assert close(g, w.expand_as(z)) and not z.requires_grad
    p = Perturber(dim=16, sees="grad")
    d = p(z, grad=g)
    assert close(token_norms(d), p.eps.item() * token_norms(z))
    assert not torch.allclose(p(z, grad=-g), d)  # the gradient steers the direction
    with pytest.raises(ValueError, match="needs grad"):
        p(z)
    again = Perturber(**p.config())  # the configuration round-trips, input width included
    again.load_state_dict(p.state_dict())
    assert torch.equal(again(z, grad=g), d) and p.config()["dim"] == 16


def perturber_inputs(p, z, seed=0):
    """What each feature of p's sees needs beside z (a gradient, a question embedding of 64), made up."""
    g = gen(seed)
    return {"grad": torch.randn(z.shape, generator=g), "question": torch.randn(z.shape[:-2] + (64,), generator=g)}


@pytest.mark.parametrize("sees", ["noise", "grad+noise", "context", "grad+noise+context"])
def test_every_perturber_keeps_the_budget_exactly_whatever_it_sees(sees):
    torch.manual_seed(0)
    p = Perturber(dim=16, sees=sees, question_dim=64, tokens=9)
    z = torch.randn(3, 9, 16) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    z[0, 4] = 0.0  # an all-zero token
    d = p(z, **perturber_inputs(p, z))
    assert d.shape == z.shape and torch.isfinite(d).all() and d[0, 4].abs().max() == 0
    assert close(token_norms(d), p.eps.item() * token_norms(z))


def test_sees_is_a_set_of_features_each_part_validated_by_name():
    assert Perturber(dim=8, sees="token+noise+grad").sees == "grad+noise" and Perturber(dim=8, sees="token+grad").sees == "grad"
    assert Perturber(dim=8, sees="context+grad", question_dim=4).features == ("token", "grad", "context")
    for bad, part in [("grad+nose", "nose"), ("grad+", ""), ("Token", "Token")]:
        with pytest.raises(ValueError, match=f"sees='{re.escape(bad)}': unknown part '{part}'"):
            Perturber(dim=8, sees=bad)
    with pytest.raises(ValueError, match="needs question_dim"):
        Perturber(dim=8, sees="context")
    # the published perturber and the gradient-seeing one keep their parameters and configuration as before
    mlp = {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "theta_eps"}
    for sees in ("token", "grad"):
        p = Perturber(dim=8, sees=sees, question_dim=4, tokens=9)
        assert set(p.state_dict()) == mlp and set(p.config()) == {"dim", "hidden", "eps_min", "eps_max", "eps_init", "relative", "sees"}


def test_noise_draws_are_different_attacks_one_per_sample_and_a_seed_repeats_them():
    torch.manual_seed(0)
    p = Perturber(dim=16, sees="noise")
    z = torch.randn(1, 9, 16).repeat(2, 1, 1)  # two samples with the same tokens
    z[:, 3] = z[:, 2]  # and two equal tokens within each
    d = p(z, generator=gen(0))
    assert torch.equal(p(z, generator=gen(0)), d)  # a seed repeats its draw
    assert not torch.allclose(d[0], d[1], atol=1e-4)  # one draw per sample: the same tokens, another attack
    assert close(d[:, 2], d[:, 3], atol=1e-7)  # shared by the sample's tokens: equal tokens, equal delta
    other = p(z, generator=gen(1))
    assert (torch.cosine_similarity(d, other, dim=-1) < 0.999).all()  # each token's direction moves with the draw
    assert close(token_norms(other), p.eps.item() * token_norms(z))


def test_a_context_perturber_reads_the_question_and_the_other_tokens(umm):
    torch.manual_seed(0)
    q = umm.question_embeds(["what color is the circle?", "how many shapes are there?"])
    assert q.shape == (2, umm.text_dim) and not q.requires_grad and not torch.allclose(q[0], q[1])
    p = Perturber(dim=8, sees="context", question_dim=umm.text_dim, tokens=9)
    z = torch.randn(1, 9, 8).repeat(2, 1, 1)  # one image, two questions
    d = p(z, question=q)
    assert not torch.allclose(d[0], d[1], atol=1e-5)  # the question steers it
    moved = z.clone()
    moved[:, 0] = torch.randn(8)  # another token 0
    assert (p(moved, question=q)[:, 1:] - d[:, 1:]).norm(dim=-1).min() > 1e-5  # every other token's delta moves with it
    mlp = Perturber(dim=8)
    assert close(mlp(moved)[:, 1:], mlp(z)[:, 1:], atol=1e-7)  # (the published perturber: each token alone)
    with pytest.raises(ValueError, match="needs question"):
        p(z)


@pytest.mark.parametrize("sees", ["grad+noise", "context", "grad+noise+context"])
def test_a_perturber_round_trips_through_its_json_whatever_it_sees(sees, tmp_path):
    torch.manual_seed(0)
    p = Perturber(dim=16, sees=sees, question_dim=64, tokens=9, eps_max=0.3, eps_init=0.1)
    with torch.no_grad():
        p.theta_eps.fill_(0.7)
        for w in p.parameters():
            w.add_(0.01 * torch.randn_like(w))  # trained weights
    save_perturber(p, tmp_path, perturb_at="vq")
    again, meta = load_perturber(str(tmp_path))
    assert meta["sees"] == sees and meta.get("noise_dim") == (8 if "noise" in sees else None)
    assert (meta.get("question_dim"), meta.get("tokens")) == ((64, 9) if "context" in sees else (None, None))
    z = torch.randn(2, 9, 16)
    kw = perturber_inputs(p, z)
    assert torch.equal(again(z, generator=gen(3), **kw), p(z, generator=gen(3), **kw)) and torch.equal(again.eps, p.eps)


@pytest.mark.parametrize("at, dim, lm, tokens, model", [("vq", 8, 256, 64, 4.4e6), ("vq", 8, 4096, 576, 7e9), ("aligner", 4096, 4096, 576, 7e9)])
def test_perturber_is_under_one_percent_of_the_backbone_whatever_it_sees(at, dim, lm, tokens, model):
    """The tiny base (4.4 M; 8-wide codebook, 256-wide LM, 8 x 8 grid) and Janus-Pro-7B (576 tokens, 4096-wide LM), seeing
    all there is to see (every other set is a part of it)."""
    n = sum(t.numel() for t in Perturber(dim=dim, sees="grad+noise+context", question_dim=lm, tokens=tokens).parameters())
    assert n < 0.01 * model, n
    assert sum(t.numel() for t in Perturber(dim=256).parameters()) < 0.01 * 4.4e6  # the published one at the tiny base's aligner


# ---------------------------------------------------------------- regulariser

def test_regularizer_terms_are_positive_and_grow_with_delta():
    torch.manual_seed(0)
    delta = 0.01 * torch.randn(2, 16, 8)
    eps = torch.tensor(0.01)
    only = {"l2": dict(w_l2=1.0, w_tv=0.0, w_eps=0.0), "tv": dict(w_l2=0.0, w_tv=1.0, w_eps=0.0),
            "eps": dict(w_l2=0.0, w_tv=0.0, w_eps=1.0)}
    for name in ("l2", "tv"):
        for grid in (None, (4, 4)):
            small = regularizer(delta, eps, grid=grid, **only[name])
            big = regularizer(2 * delta, eps, grid=grid, **only[name])
            assert 0 < small < big, (name, grid)
    assert 0 < regularizer(delta, eps, **only["eps"]) < regularizer(delta, 2 * eps, **only["eps"])
    assert close(regularizer(delta, eps, **only["l2"]), delta.pow(2).sum(-1).mean())
    assert close(regularizer(delta, eps, **only["eps"]), eps ** 2)
    total = regularizer(delta, eps)  # default weights: 1e-3 each
    parts = sum(regularizer(delta, eps, **w) for w in only.values())
    assert close(total, 1e-3 * parts)


def test_tv_is_zero_with_zero_gradient_for_a_constant_field():
    delta = torch.randn(8).expand(2, 16, 8).clone().requires_grad_(True)
    for grid in (None, (4, 4)):
        tv = total_variation(delta, grid)
        assert tv == 0
        (g,) = torch.autograd.grad(tv, delta)
        assert torch.isfinite(g).all() and (g == 0).all()


def test_tv_on_a_grid_uses_horizontal_and_vertical_neighbours():
    a, b = torch.zeros(3), torch.tensor([3.0, 4.0, 0.0])  # ‖b − a‖ = 5
    delta = torch.stack([a, a, b, b])  # rows of a 2x2 grid: (a a) over (b b)
    # grid: horizontal pairs a-a, b-b, vertical pairs a-b, a-b -> 10 / 4
    assert math.isclose(total_variation(delta, grid=(2, 2)).item(), 2.5)
    # sequence: pairs a-a, a-b, b-b -> 5 / 3
    assert math.isclose(total_variation(delta).item(), 5 / 3, rel_tol=1e-6)


# ---------------------------------------------------------------- random baseline, PGD, the free PGD step and jitter

@pytest.mark.parametrize("relative", [True, False])
def test_random_like_has_exactly_the_budget(relative):
    z = 100 * torch.randn(4, 10, 16, generator=gen(1))
    z[1, 2] = 0
    delta = random_like(z, 0.02, relative=relative, generator=gen(2))
    want = 0.02 * token_norms(z) if relative else torch.full(z.shape[:-1], 0.02, dtype=torch.float64)
    assert close(token_norms(delta), want)
    assert torch.equal(random_like(z, 0.02, relative=relative, generator=gen(2)), delta)


@pytest.mark.parametrize("relative", [True, False])
def test_pgd_stays_in_budget_and_beats_a_random_delta(relative):
    torch.manual_seed(0)
    z = 3 * torch.randn(8, 12, 16)
    w = torch.randn(16, 5)
    target = torch.randint(0, 5, (8, 11))

    def loss_fn(x):  # per-sample cross-entropy of a linear read-out; the last token is ignored (zero gradient)
        logits = (x[:, :-1] @ w).flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, target.flatten(), reduction="none").view(8, 11).mean(-1)

    eps = 0.05
    budget = eps * token_norms(z) if relative else torch.full(z.shape[:-1], eps, dtype=torch.float64)
    with torch.no_grad():  # the evaluation calls it without grad; it must still attack
        delta = pgd_attack(loss_fn, z, eps, steps=10, relative=relative, generator=gen(3))
        overshooting = pgd_attack(loss_fn, z, eps, steps=3, step_size=3 * eps, relative=relative, generator=gen(3))
    assert not delta.requires_grad and torch.isfinite(delta).all()
    for d in (delta, overshooting):
        assert (token_norms(d) <= budget * (1 + 1e-5)).all()
    rand = random_like(z, eps, relative=relative, generator=gen(4))
    clean, attacked, randomised = (loss_fn(z + d).sum().item() for d in (torch.zeros_like(z), delta, rand))
    assert attacked > max(clean, randomised) + 1e-3


def test_pgd_refine_reuses_a_given_gradient_for_its_first_step_and_stays_in_budget():
    torch.manual_seed(0)
    z, w, target = 3 * torch.randn(8, 12, 16), torch.randn(16, 5), torch.randint(0, 5, (8, 12))

    def loss_fn(x):
        return F.cross_entropy((x @ w).flatten(0, 1), target.flatten(), reduction="none").view(8, 12).mean(-1)

    start = random_like(z, 0.05, generator=gen(1))
    d = start.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(z + d).sum(), d)
    computed, given = pgd_refine(loss_fn, z, start, 0.05, 3, 0.06), pgd_refine(loss_fn, z, start, 0.05, 3, 0.06, grad=g)
    assert torch.allclose(computed, given, atol=1e-6)  # the gradient given is the one it would have computed
    assert (token_norms(given) <= 0.05 * token_norms(z) * (1 + 1e-5)).all()
    assert loss_fn(z + given).sum() > loss_fn(z + start).sum() + 1e-3
    downhill = pgd_refine(loss_fn, z, start, 0.05, 1, 0.06, grad=-g)  # the first step follows the gradient it is given
    assert loss_fn(z + downhill).sum() < loss_fn(z + start).sum()


def test_jitter_keeps_each_tokens_length_and_tilts_its_direction_a_little():
    delta = random_like(torch.randn(4, 10, 16, generator=gen(0)), 0.3, generator=gen(1)) * torch.rand(4, 10, 1, generator=gen(2))
    a, b = jitter(delta, 0.3, gen(3)), jitter(delta, 0.3, gen(4))
    assert close(token_norms(a), token_norms(delta)) and not torch.equal(a, b)
    cos = F.cosine_similarity(a, delta, dim=-1)
    assert (cos > 0.8).all() and (cos < 1 - 1e-4).all()


# ================================================================================================
# buffer.py: hardness, the selection of hard samples, the hard buffer

# ---------------------------------------------------------------- hardness and selection

def test_hardness_adds_a_penalty_only_below_tau():
    ce = torch.tensor([1.0, 1.0, 2.0])
    s = torch.tensor([0.5, 0.0, -0.3])
    assert close(hardness(ce, s, lambda_c=2.0, tau=0.2), torch.tensor([1.0, 1.4, 3.0]))


def test_select_hard_respects_quantile_topk_and_both_rules():
    H = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    s = torch.tensor([0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    src = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 4, 4])
    q = torch.quantile(H, 0.5)  # 4.5: candidates 0..4 clear it
    assert (H[:5] >= q).all() and (H[5:] < q).all()
    consistent = select_hard(H, s, src, q=0.5, topk=2, tau=0.2, rule="consistent")
    assert consistent.tolist() == [0, 2, 3, 4]  # 1 is inconsistent; source 0 then gives 0 and 2
    published = select_hard(H, s, src, q=0.5, topk=2, tau=0.2, rule="published")
    assert published.tolist() == [0, 1, 3, 4]  # 1 stays; source 0 is capped at its two hardest
    assert select_hard(H, s, src, q=0.5, topk=1, rule="published").tolist() == [0, 3, 4]
    assert select_hard(H, s, src, q=0.0, topk=10, rule="published").tolist() == list(range(10))
    assert consistent.dtype == torch.long


def test_select_hard_rejects_an_unknown_rule_by_name():
    with pytest.raises(ValueError, match="strict"):
        select_hard(torch.rand(4), torch.rand(4), torch.arange(4), rule="strict")


# ---------------------------------------------------------------- the buffer

def test_buffer_keeps_the_hardest_items_sorted_at_capacity():
    buf = HardBuffer(capacity=5)
    H = torch.randperm(12, generator=gen(0)).float()
    buf.push(H[:7], [f"item{int(h)}" for h in H[:7]])
    buf.push(H[7:].tolist(), [f"item{int(h)}" for h in H[7:]])
    assert len(buf) == 5
    assert [h for h, _ in buf.entries] == [11.0, 10.0, 9.0, 8.0, 7.0]
    assert [item for _, item in buf.entries] == ["item11", "item10", "item9", "item8", "item7"]
    with pytest.raises(ValueError):
        buf.push([1.0, 2.0], ["only one"])


def test_sample_pops_what_it_returns_and_stops_when_empty():
    buf = HardBuffer(capacity=100)
    buf.push(torch.arange(10.0), list(range(10)))
    first = buf.sample(4, generator=gen(0))
    assert len(first) == 4 and len(set(first)) == 4 and len(buf) == 6
    rest = buf.sample(50, generator=gen(1))  # asks for more than there is
    assert len(rest) == 6 and sorted(first + rest) == list(range(10))
    assert len(buf) == 0 and buf.sample(3) == []


def test_first_draw_frequencies_match_the_rank_softmax():
    T, N, draws = 1.75, 10, 10000
    buf = HardBuffer(capacity=N, temperature=T)
    buf.push(torch.arange(N, 0, -1).float(), list(range(N)))  # item r has rank r
    g = gen(0)
    counts = torch.zeros(N)
    for _ in range(draws):
        (item,) = buf.sample(1, generator=g)
        counts[item] += 1
        buf.push([float(N - item)], [item])  # put it back: every draw is a first draw from the same 10
    weights = torch.tensor([math.exp((N - 1 - r) / (N - 1) / T) for r in range(N)])
    p = weights / weights.sum()
    std = (p * (1 - p) / draws).sqrt()
    assert ((counts / draws - p).abs() < 4 * std).all(), (counts / draws, p)
    assert close(buf.probabilities().float(), p)
    assert math.isclose(p[0] / p[-1], math.exp(1 / T), rel_tol=1e-5)  # hardest vs easiest


def test_state_dict_round_trips_exactly(tmp_path):
    buf = HardBuffer(capacity=8, temperature=1.5)
    items = [{"tokens": torch.randint(0, 512, (16,)), "question": f"q{i}", "answer": [i, "red"]} for i in range(5)]
    H = torch.tensor([0.1, 2.0 / 3.0, 1e-9, 5.5, 2.0 / 3.0], dtype=torch.float64)
    buf.push(H, items)
    path = tmp_path / "buf.pt"
    torch.save(buf.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"capacity", "temperature", "H", "items"}
    again = HardBuffer()
    again.load_state_dict(state)
    assert (again.capacity, again.temperature, len(again)) == (8, 1.5, 5)
    assert [h for h, _ in again.entries] == [h for h, _ in buf.entries]
    for (_, a), (_, b) in zip(again.entries, buf.entries):
        assert a["question"] == b["question"] and a["answer"] == b["answer"]
        assert torch.equal(a["tokens"], b["tokens"])
    same_draws = [x["question"] for x in again.sample(5, generator=gen(7))]
    assert same_draws == [x["question"] for x in buf.sample(5, generator=gen(7))]


# ================================================================================================
# configuration: configurator.py, the shipped config files, and what train.py refuses at start-up

def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=timeout)


def configure(argv, defaults="batch_size = 32\nlr = 1e-3\nout_dir = 'out'\ngame = True\n"):
    """Run configurator.py on `argv` over `defaults`, as train.py does; return (returncode, output)."""
    code = f"import sys; sys.argv = ['train.py'] + {argv!r}\n{defaults}exec(open('configurator.py').read())\n" \
           "print(batch_size, lr, repr(out_dir), game)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    return r.returncode, (r.stdout + r.stderr).strip()


# ---------------------------------------------------------------- configurator.py

@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"], "unknown key 'batch_sise'; did you mean 'batch_size'"),
    (["--batch_size=eight"], "batch_size='eight': expected int, got str"),
    (["--lr=True"], "lr=True: expected float, got bool"),
    (["--game=1"], "game=1: expected bool, got int"),
    (["--lr"], "flag --lr needs a value"),
    (["no_such_file.py"], "cannot read config file no_such_file.py"),
])
def test_configurator_rejects_bad_keys_and_types(argv, message):
    code, out = configure(argv)
    assert code != 0 and message in out, out


def test_configurator_file_then_flags_override(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 3\nlr = 0.5\nout_dir = 'x'\n")
    assert configure([str(cfg), "--lr=2e-4", "--out_dir=123", "--game=False"]) == (0, "3 0.0002 '123' False")
    cfg.write_text("batch_sze = 3\n")
    code, out = configure([str(cfg)])
    assert code != 0 and "unknown key 'batch_sze'" in out


@pytest.mark.parametrize("script, lines", [
    ("train.py", ["batch_size = 16  # per process", "lr, min_lr, warmup_iters = 0.0005, 5e-05, 20  # the understanding player's AdamW",
                  "vqav2_questions = vqav2_annotations = vqav2_images = ''  # VQAv2's train2014", "# the game (game=False: the SFT",
                  "#   'random': the control arm", "device = 'cpu'", "debug_nan_at = ''  # test hook"]),
    ("eval.py", ["adv_steps = 5", "n = 1000  # test (and ood) samples for understanding", "perturb_at = None  # 'vq' | 'aligner'",
                 "#                 unconditional prompts (gen_uncond_p)"]),
    ("bench.py", ["preset = 'tiny'  # 'tiny' | 'janus-pro-1b' | 'janus-pro-7b'", "batch_size = None  # None: the preset's",
                  "# system", "seed = 0"]),
])
def test_help_prints_the_usage_and_every_key_with_its_default_and_comment(script, lines):
    """--help: the script's docstring, then its configuration block with each default as it stands and each comment,
    and exit 0 before anything else runs (a flag after it, bad or not, is not read)."""
    r = subprocess.run([sys.executable, script, "--help", "--no_such_key=1"], capture_output=True, text=True, cwd=HERE,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and "config error" not in r.stdout + r.stderr, r.stdout + r.stderr
    out = r.stdout.splitlines()
    src = open(os.path.join(HERE, script)).read()
    assert out[0] == src.split('"""')[1].strip().splitlines()[0]  # the docstring's first line
    assert f"usage: python {script} [config/file.py ...] [--key=value ...]; the keys and their defaults:" in out
    for line in lines:
        assert any(o.startswith(line) for o in out), (line, r.stdout)
    if script == "train.py":  # -h alike; and every key of the configuration block, each on a line of its own
        assert configure(["-h", "--batch_size=oops"]) == (0, configure(["--help"])[1])
        block = src[src.index("# configuration\n"):src.index("exec(open(")]
        keys = {}
        exec(block, {"torch": torch, "os": os}, keys)
        assigned = [re.findall(r"\w+", o.split("  #")[0].rsplit(" = ", 1)[0]) for o in out if not o.startswith("#") and " = " in o]
        assert sorted(sum(assigned, [])) == sorted(keys)


def test_train_rejects_an_unknown_key_at_start_up():
    r = run_train("--max_iter=5")
    assert r.returncode != 0 and "unknown key 'max_iter'; did you mean 'max_iters'" in r.stderr


JANUS_PRO_CONFIGS = ["config/unigame_janus_pro_1b.py", "config/unigame_janus_pro_7b.py"]


@pytest.mark.parametrize("path", JANUS_PRO_CONFIGS)
def test_janus_pro_configs_load_through_the_configurator_with_the_published_values(path, monkeypatch):
    """train.py's own configuration block, then configurator.py on the file, as train.py runs them: every
    key must be known and of the right type. Then the values the paper publishes."""
    src = open(os.path.join(HERE, "train.py")).read()
    block = src[src.index("# configuration\n"):src.index("exec(open(")]  # train.py's globals and their defaults
    monkeypatch.setattr(sys, "argv", ["train.py", os.path.join(HERE, path)])
    c = {"torch": torch, "os": os}
    exec(block + open(os.path.join(HERE, "configurator.py")).read(), c)
    scope = {}
    exec(open(os.path.join(HERE, path)).read(), {}, scope)
    assert scope and all(c[k] == v and type(c[k]) is type(v) for k, v in scope.items())
    assert c["dataset"] == "vqav2" and all(c[k] for k in ("init_from", "vqav2_questions", "vqav2_annotations", "vqav2_images"))
    assert (c["lora_r"], c["lora_alpha"], c["lora_dropout"], c["train_modules"]) == (16, 32, 0.05, "")
    assert (c["perturb_at"], c["eps_relative"], c["eps_max"], c["eps_init"]) == ("aligner", False, 0.02, 0.01)
    assert 80 <= c["lam"] <= 120 and c["lr_G"] == 1e-2 and 3e-6 <= c["lr"] <= 5e-6 and c["weight_decay"] == 0.01
    assert c["w_clean"] == 1.0 and c["grad_clip"] == 1.0 and 1 <= c["batch_size"] <= 8 and 6 <= c["hard_bs"] <= 8
    assert 0.7 <= c["q_hard"] <= 0.8 and c["buffer_capacity"] == 4096 and 1.5 <= c["buffer_temperature"] <= 2.0
    assert c["gradient_checkpointing"] == ("7b" in path)


# ---------------------------------------------------------------- train.py's start-up checks
# train_cmd and run_cmd run train.py for real with tiny settings; the checkpoint, fault and DDP sections use them too.

# 16 samples, 4 a batch: an epoch is 4 steps. q_hard=0, tau=-1 keep every candidate, hard_bs=1 pops one
# a step, so the hard buffer fills up and its contents are worth comparing.
TINY = ["--batch_size=4", "--hard_bs=1", "--train_n=16", "--eval_n=4", "--eval_interval=0", "--log_interval=1",
        "--lora_r=4", "--threads=1", "--tau=-1.0", "--q_hard=0.0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(model_dir, out_dir, *args, nproc=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return [*launcher, os.path.join(HERE, "train.py"), f"--init_from={model_dir}", f"--out_dir={out_dir}", *TINY, *args]


def run_cmd(cmd, timeout=300):
    """(return code, stdout + stderr) of a command run in the repository. On a timeout the whole process
    group goes, so that no DDP rank outlives its launcher."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE, env=ENV,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out = p.communicate()[0]
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-3000:]}")
    return p.returncode, out.replace("\r", "\n")


def last_line(out):
    return out.strip().splitlines()[-1]


def test_impossible_settings_fail_at_start_up_each_named_before_any_work(tmp_path):
    code, out = run_cmd([sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={tmp_path / 'out'}", "--max_iters=0",
                         "--hard_bs=-1", "--q_hard=1.5", "--eps_min=0.2", "--eps_max=0.1", "--lora_r=0", "--mine=draw",
                         "--export_dtype=float8", "--train_n=8", "--batch_size=16", "--debug_nan_at=x", "--max_bad_steps=0",
                         "--train_modules=vision,ears", f"--init_from={tmp_path / 'nothing'}", "--answer_tokens=0",
                         "--eval_vqav2_questions=val.json", "--perturber_sees=grad+nose", "--code_swaps=2"])
    assert code != 0 and "Traceback" not in out, out[-3000:]
    for message in ["max_iters=0: must be >= 1", "hard_bs=-1: must be >= 0", "q_hard=1.5: a quantile, must lie in [0, 1]",
                    "eps_min=0.2, eps_init=0.15, eps_max=0.1: need 0 <= eps_min < eps_init < eps_max",
                    "mine='draw': expected one of 'decode', 'generate'",
                    "export_dtype='float8': expected one of 'float32', 'float16', 'bfloat16'",
                    "train_n=8: fewer samples than one global batch, batch_size*world_size=16*1",
                    "train_modules='vision,ears': unknown part(s) ['ears']",
                    "debug_nan_at='x': expected a comma list of iterations", "max_bad_steps=0: must be >= 1",
                    "answer_tokens=0: must be >= 1", "evaluation on VQAv2 val needs real data, the files eval_vqav2_questions='val.json'",
                    f"init_from='{tmp_path / 'nothing'}': expected 'resume' or a Hugging Face model directory",
                    "perturber_sees='grad+nose': unknown part(s) ['nose']",
                    "perturber_sees='grad+nose' plays on the batch's own samples and candidates: use adversary='learned', mine='decode'",
                    "code_swaps=2: swaps codes of the learned perturber's own images"]:
        assert f"config error: {message}" in out, (message, out[-3000:])
    assert not (tmp_path / "out").exists()  # stopped before anything was written
    code, out = run_cmd([sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={tmp_path / 'out'}", "--lora_r=0"])
    assert code != 0 and last_line(out) == "config error: nothing trains: lora_r=0 and train_modules='': set train_modules and/or lora_r"
    code, out = run_cmd([sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={tmp_path / 'out'}", "--init_from=scratch"])
    assert code != 0 and "built by assets/build_base.py" in last_line(out)


def test_mine_generate_without_a_generation_head_fails_before_the_weights_load(small_dir, tmp_path):
    model = tmp_path / "no_generation_head"
    shutil.copytree(small_dir, model)
    weights = load_file(model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".generation_head." not in k}, model / "model.safetensors", metadata={"format": "pt"})
    code, out = run_cmd(train_cmd(model, tmp_path / "out", "--mine=generate", "--max_iters=1"))
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert last_line(out) == f"config error: mine='generate' needs a generation head, but {model} has no generation_head weights"


# ================================================================================================
# the game: single steps, then train.py end to end on a very small saved model (small_dir)

# ---------------------------------------------------------------- single steps

def sgd_step(params, loss, lr):
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g / (g.norm() + 1e-12)


def test_one_sft_step_lowers_the_loss_on_a_fixed_batch(tok, train64):
    m = tiny(tok, seed=2).train()
    images, qs, ans, caps = batch_of(train64, 8)
    px = m.preprocess(images)
    codes = m.image_codes(px)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def loss():
        return m.answer_loss(m.image_embeds(px), qs, ans).mean() + m.image_loss(caps, codes).mean()
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before - 1e-3


@pytest.mark.parametrize("at", ["vq", "aligner"])
def test_one_perturber_step_raises_the_adversarial_loss(umm, train64, at):
    images, qs, ans, _ = batch_of(train64, 8)
    with torch.no_grad():
        tokens = umm.visual_tokens(umm.preprocess(images), at)
    torch.manual_seed(0)
    p = Perturber(tokens.shape[-1], eps_max=0.6, eps_init=0.5)

    def adv_loss():
        return umm.answer_loss(umm.perturbed_view(tokens + p(tokens), at)[0], qs, ans).mean()
    before = adv_loss()
    # loss_G = -lambda * CE + R(delta); the model takes no weight gradients in this pass
    loss_G = -100 * before + regularizer(p(tokens), p.eps, grid=(umm.grid, umm.grid))
    sgd_step(list(p.parameters()), loss_G, lr=0.5)
    assert all(q.grad is None for q in umm.parameters())
    with torch.no_grad():
        assert adv_loss() > before.detach() + 1e-4


def test_one_understanding_step_lowers_the_loss_on_hard_samples(tok, train64):
    m = tiny(tok, seed=3).train()
    images, qs, ans, _ = batch_of(train64, 8)
    with torch.no_grad():
        tokens = m.visual_tokens(m.preprocess(images), "vq")
        hard_codes = m.project_to_codebook(tokens + random_like(tokens, 0.4, generator=torch.Generator().manual_seed(0)))[1]
        hard_px = m.decode_codes(hard_codes).clamp(-1, 1)
    add_lora(m.janus.model.language_model, r=4, alpha=8, dropout=0.0)
    lora = [p for n, p in m.named_parameters() if "lora" in n]
    m.requires_grad_(False)
    for p in lora:
        p.requires_grad_(True)

    def hard_loss():
        return m.answer_loss(m.image_embeds(hard_px), qs, ans).mean()
    before = hard_loss()
    sgd_step(lora, before, lr=0.5)
    with torch.no_grad():
        assert hard_loss() < before.detach() - 1e-3


def perturbed_on_the_base(umm):
    """16 test samples of the base at 'vq': the answer loss of a view of tokens, the clean tokens z, an untrained
    perturber's delta at eps 0.15 (with its graph) and the loss's gradient at it."""
    recs = world("test", 16)
    px = umm.preprocess([r["image"] for r in recs])
    qs, ans = [r["question"] for r in recs], [r["answers"][0] for r in recs]
    torch.manual_seed(0)
    p = Perturber(umm.token_dim("vq"), eps_max=0.3, eps_init=0.15)

    def ce(t):
        return umm.answer_loss(umm.perturbed_view(t, "vq")[0], qs, ans)
    with torch.no_grad():
        z = umm.visual_tokens(px, "vq")
    delta = p(z)
    (g,) = torch.autograd.grad(ce(z + delta).sum(), delta)
    return ce, z, delta, g


def test_one_free_pgd_step_from_the_perturbers_delta_raises_the_answer_loss_on_the_base(shapes_base):
    ce, z, delta, g = perturbed_on_the_base(shapes_base)
    refined = pgd_refine(ce, z, delta.detach(), 0.15, 1, 1.25 * 0.15, grad=g)
    with torch.no_grad():
        before, after = ce(z + delta).mean().item(), ce(z + refined).mean().item()
    assert after > 2 * before and after > before + 0.02, (before, after)


def test_code_swaps_from_the_perturbers_gradient_land_on_reachable_entries_and_raise_the_answer_loss_on_the_base(shapes_base):
    ce, z, delta, g = perturbed_on_the_base(shapes_base)
    delta = delta.detach()
    proposals = swap_proposals(z, delta, g, shapes_base.codebook, 0.15, 3)
    codes = [shapes_base.project_to_codebook(z + d)[1] for d in [delta, *proposals]]
    moved = [(d != delta).any(-1) for d in proposals]
    assert len(proposals) == 3
    for d, c, m in zip(proposals, codes[1:], moved):
        assert (d.norm(dim=-1) <= 0.15 * z.norm(dim=-1) * (1 + 1e-5)).all()  # inside the budget
        assert (c[m] != codes[0][m]).all() and (c[~m] == codes[0][~m]).all()  # a moved token takes another entry; the rest keep theirs
    assert moved[0].float().mean() > 0.2 and (moved[1] <= moved[0]).all() and (moved[2] <= moved[1]).all()  # nested
    n = z.shape[1]  # the j-th moves the top 1/2^(j-1) of the tokens by gain (the first: every one with a gain)
    assert (moved[1].sum(-1) == moved[0].sum(-1).clamp(max=n // 2)).all() and (moved[2].sum(-1) == moved[0].sum(-1).clamp(max=n // 4)).all()
    with torch.no_grad():
        before, after = ce(z + delta), torch.stack([ce(z + d) for d in proposals]).max(0).values
    assert after.mean() > 2 * before.mean() and after.mean() > before.mean() + 0.05, (before.mean(), after.mean())


# ---------------------------------------------------------------- game steps through train.py

def quick_train(small_dir, out_dir, *args, nproc=0):
    argv = [f"--init_from={small_dir}", f"--out_dir={out_dir}", "--batch_size=4", "--hard_bs=2", "--train_n=64",
            "--eval_n=8", "--eval_interval=0", "--log_interval=1", "--lora_r=4", "--threads=1", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    r = subprocess.run([*launcher, os.path.join(HERE, "train.py"), *argv], capture_output=True, text=True, cwd=HERE,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.replace("\r", "\n") + r.stderr.replace("\r", "\n")


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


@pytest.mark.parametrize("at, mine", [("vq", "decode"), ("aligner", "decode"), ("vq", "generate"), ("aligner", "generate")])
def test_every_interface_and_mining_mode_runs_a_game_step(small_dir, clip_dir, tmp_path, at, mine):
    clip = [f"--clip_path={clip_dir}"] if (at, mine) == ("vq", "generate") else []  # CLIP scores generated images
    out = quick_train(small_dir, tmp_path, "--max_iters=2", f"--perturb_at={at}", f"--mine={mine}",
                      "--tau=-1.0", "--q_hard=0.0", *clip)
    steps = [r for r in read_log(tmp_path) if "adv" in r]
    assert [r["iter"] for r in steps] == [1, 2]
    assert all(r["buffer"] > 0 and 0 < r["eps"] <= 0.5 and "hard" in r for r in steps[1:])
    assert "under_perturber" in out


# ---------------------------------------------------------------- the control arm, PGD-AT, and the game in the log
# adversary=random is the control arm, adversary=pgd PGD adversarial training (no perturber to learn).

def test_the_random_control_arm_fills_the_buffer_but_never_trains_the_perturber(small_dir, tmp_path):
    quick_train(small_dir, tmp_path, "--max_iters=2", "--adversary=random", "--tau=-1.0", "--q_hard=0.0")
    steps = [r for r in read_log(tmp_path) if "adv" in r]
    assert [r["iter"] for r in steps] == [1, 2] and steps[0]["buffer"] > 0 and "hard" in steps[1]
    ckpt = tmp_path / "ckpt"
    state, moments = load_file(ckpt / "state.safetensors"), load_file(ckpt / "optim.safetensors")
    assert abs(torch.sigmoid(state["perturber.theta_eps"]).item() - 0.5) < 1e-6  # eps still eps_init, mid-range
    assert not any(k.startswith("perturber.") for k in moments)  # its optimizer never stepped


def test_code_swaps_in_the_game_keep_per_sample_the_hardest_of_the_perturbers_images_and_its_swaps(small_dir, tmp_path):
    quick_train(small_dir, tmp_path, "--max_iters=2", "--code_swaps=2", "--tau=-1.0", "--q_hard=0.0")
    steps = [r for r in read_log(tmp_path) if "adv" in r]
    assert [r["iter"] for r in steps] == [1, 2] and "hard" in steps[1]
    for r in steps:  # adv is each sample's hardest of the perturber's image (adv_start) and the swaps', swapped the share made harder
        assert 0 <= r["swapped"] <= 1 and r["adv"] >= r["adv_start"] - 1e-6 and (r["adv"] > r["adv_start"]) == (r["swapped"] > 0)


@pytest.mark.parametrize("adversary", ["learned", "pgd", "learned --perturber_sees=grad", "learned --perturber_sees=grad+noise",
                                       "learned --perturber_sees=context"])
def test_the_log_tells_whether_the_game_is_played(small_dir, tmp_path, adversary):
    adversary, *sees = adversary.split()
    quick_train(small_dir, tmp_path, "--max_iters=2", f"--adversary={adversary}", "--pgd_steps=2", "--refine_steps=2", "--tau=-1.0",
                "--q_hard=0.0", "--eval_adv_steps=1", *sees)  # refine_steps: the aim step of the learned perturber (PGD ignores it)
    steps = [r for r in read_log(tmp_path) if "adv" in r]
    assert [r["iter"] for r in steps] == [1, 2]
    for r in steps:
        assert 0 <= r["changed"] <= 1 and r["gap"] == pytest.approx(r["adv"] - r["und"]) and r["buffer"] >= 0
        assert set(r["ms"]) == {"perturber", "mine", "understand", "step"}
    assert "hard" in steps[1]
    after = read_log(tmp_path)[-1]["summary"]["after"]
    assert "under_pgd_1_steps" in after and ("under_perturber" in after) == (adversary == "learned")
    moments = load_file(tmp_path / "ckpt" / "optim.safetensors")
    assert any(k.startswith("perturber.") for k in moments) == (adversary == "learned")  # PGD has nothing to learn
    if sees:  # eval.py rebuilds the perturber, from the checkpoint and from its export beside the model, and evaluates it as trained
        sees, umm, recs = sees[0].split("=")[1], ev.load(str(tmp_path), "cpu"), world("test", 4)
        tokens, deltas = umm.visual_tokens(ev._pixels(umm, recs)), []
        for path in (tmp_path, tmp_path / "ckpt" / "model"):
            own, info = ev.own_perturber(str(path))
            assert own.sees == sees and info["sees"] == sees
            deltas.append(ev.perturber_delta(umm, own)(tokens, [r["question"] for r in recs], [ev.label(r) for r in recs]))
        assert torch.equal(*deltas)
        assert 0 <= ev.understanding_accuracy(umm, recs, ev.perturbed_embed(umm, ev.perturber_delta(umm, own)), progress=False) <= 1


# ---------------------------------------------------------------- the Janus-Pro 7B configuration end to end

def test_janus_pro_7b_config_runs_on_a_small_janus_pro_and_exports_model_and_perturber(tok, pro128, tmp_path):
    """The 7B configuration end to end on VQAv2-format files, with only the paths and sizes overridden:
    aligner tokens, an absolute budget, gradient checkpointing, evaluation on the val files with the short-answer
    prompt; then the export."""
    pro128.save_pretrained(tmp_path / "base")
    (tmp_path / "vqa").mkdir()
    (tmp_path / "val").mkdir()
    q, a, images = write_vqav2(tmp_path / "vqa", two_questions_per_image)  # 6 questions: 3 batches of 2 an epoch
    val = write_vqav2(tmp_path / "val")
    argv = [JANUS_PRO_CONFIGS[1], f"--init_from={tmp_path / 'base'}", f"--vqav2_questions={q}", f"--vqav2_annotations={a}",
            f"--vqav2_images={images}", f"--out_dir={tmp_path / 'out'}", f"--export_dir={tmp_path / 'export'}",
            f"--eval_vqav2_questions={val[0]}", f"--eval_vqav2_annotations={val[1]}", f"--eval_vqav2_images={val[2]}",
            "--batch_size=2", "--hard_bs=2", "--max_iters=2", "--eval_n=2", "--log_interval=1", "--num_workers=0",
            "--tau=-1.0",
            "--device=cpu", "--dtype=float32", "--compile=False", "--threads=1"]
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv], capture_output=True, text=True, cwd=HERE,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x for x in read_log(tmp_path / "out") if "adv" in x]
    assert [x["iter"] for x in steps] == [1, 2] and all(0 < x["eps"] < 0.02 for x in steps)
    assert f"evaluating on the first 2 readable questions of {val[0]}" in r.stdout
    assert read_log(tmp_path / "out")[-1]["summary"]["eval_set"] == f"the first 2 readable questions of {val[0]}"
    assert json.load(open(tmp_path / "out" / "ckpt" / "rank0.json"))["data_position"] == [0, 2]  # all 6 trained on
    config = json.load(open(tmp_path / "out" / "ckpt" / "ckpt.json"))["config"]
    assert (config["prompt_suffix"], config["answer_tokens"]) == (SUFFIX, 16)
    JanusForConditionalGeneration.from_pretrained(tmp_path / "export")
    for d in (tmp_path / "export", tmp_path / "out" / "ckpt" / "model"):
        perturber, meta = load_perturber(str(d))
        assert (meta["dim"], meta["relative"], meta["perturb_at"], meta["eps_max"]) == (64, False, "aligner", 0.02)


# ================================================================================================
# eval.py: the official VQA accuracy, the axes, robustness (PGD at the interface, in pixel space), the
# checkpoint's own perturber, the hard buffer's label preservation, --compare, and eval.json end to end

# ---------------------------------------------------------------- VQA accuracy

@pytest.mark.parametrize("raw, normalised", [
    ("Two.", "2"), ("none", "0"),                                   # number words to digits; a final period goes
    ("the dog", "dog"), ("a red car", "red car"), ("An apple", "apple"),  # articles dropped, case folded
    ("dont", "don't"), ("Isnt", "isn't"), ("it's", "it's"),         # contractions restored; apostrophes kept
    ("1,000", "1000"),                                              # a comma between digits is deleted...
    ("yes, it is", "yes it is"),                                    # ...so is one touching a space...
    ("yes,it", "yes it"), ("red-and-white", "red and white"),       # ...other marks become a space
    ("x-ray, 2,000", "xray 2000"),                                  # a digit comma anywhere deletes every mark
    ("3.5", "3.5"), ("3.5.", "3.5"), ("dog.", "dog"),               # a period survives only before a digit
    ("  Hello!\n", "hello"),
])
def test_vqa_answer_normalisation_of_tricky_cases(raw, normalised):
    assert ev.normalize_answer(raw) == normalised


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matches, expected):
    """k of 10 annotators said "2". Leaving out one of those k, k-1 of the other nine match; leaving out
    any other, k do. 1: 9 * (1/3) / 10 = 0.3; 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 3: (3 * 2/3 + 7 * 1) / 10
    = 0.9 (not min(3/3, 1) = 1); 4: every subset keeps 3 matches, 1.0."""
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert ev.vqa_accuracy("2", answers) == pytest.approx(expected)


# Tricky cases and the score each gets from the official evaluation script: computed with vqaEval.py of
# GT-Vision-Lab/VQA (PythonEvaluationTools/vqaEvaluation, commit a013f00), run under Python 2.7 on these cases
# as VQAv2 stores them (ten answer dicts with distinct answer_id), its evalQA read at 10 decimals.
VQAEVAL_REFERENCE = [
    # ten identical answers: nothing is normalised, only the ends and newlines/tabs of each answer stripped
    ("two", ["two"] * 10, 1.0), ("Two", ["two"] * 10, 0.0), ("2", ["two"] * 10, 0.0), ("dog", ["a dog"] * 10, 0.0),
    ("1,000", ["1000"] * 10, 0.0), (" two\n", ["two"] * 10, 1.0), ("yes.", ["yes"] * 10, 0.0), ("yes", [" yes\t"] * 10, 1.0),
    ("t-shirt", ["t shirt"] * 10, 0.0),
    # the annotators disagree: both sides through processPunctuation, then processDigitArticle
    ("Two", ["two"] * 9 + ["2"], 1.0), ("a dog", ["dog"] * 3 + ["cat"] * 7, 0.9), ("1,000", ["1000"] * 5 + ["1,000"] * 5, 1.0),
    ("yes", ["Yes"] * 5 + ["yes"] * 5, 1.0), ("The Dog.", ["dog"] * 2 + ["dogs"] * 2 + ["cat"] * 6, 0.6),
    ("red-white", ["red white"] * 4 + ["red"] * 6, 1.0), ("yes, it is", ["yes it is"] * 3 + ["no"] * 7, 0.9),
    ("x-ray, 2,000", ["xray 2000"] * 3 + ["no"] * 7, 0.9), ("dont", ["don't"] * 2 + ["no"] * 8, 0.6),
    ("3.5.", ["3.5"] + ["4"] * 9, 0.3), ("none", ["0"] * 4 + ["1"] * 6, 1.0), ("t-shirt", ["t shirt"] * 9 + ["shirt"], 1.0),
    ("somebody'd", ["somebodyd"] * 3 + ["no"] * 7, 0.9), ("an apple", ["apple"] + ["pear"] * 9, 0.3),
    ("One", ["one"] * 2 + ["1"] + ["2"] * 7, 0.9), ("pink and white", ["pink and white", "pink & white"] + ["pink"] * 8, 0.3),
    # min(1, matches among the other nine / 3), averaged over the ten
    ("2", ["2"] + ["3"] * 9, 0.3), ("2", ["2"] * 2 + ["3"] * 8, 0.6), ("2", ["2"] * 3 + ["3"] * 7, 0.9), ("2", ["2"] * 4 + ["3"] * 6, 1.0),
    # more than 32 periods: the script's re.UNICODE lands in re.sub's count, so only 32 go
    ("yes" + "." * 40, ["yes"] * 5 + ["no"] * 5, 0.0),
]


@pytest.mark.parametrize("pred, answers, expected", VQAEVAL_REFERENCE)
def test_vqa_accuracy_equals_the_official_script_case_for_case(pred, answers, expected):
    assert ev.vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_accuracy_conventions_of_lmms_eval_and_of_normalising_both_sides():
    # lmms-eval: the prediction always through EvalAI's answer processor, the annotators' answers only when they disagree
    for pred, answers, expected in [("Two", ["2"] * 10, 1.0), ("a dog", ["dog"] * 10, 1.0), ("1,000", ["1000"] * 10, 1.0),
                                    ("two", ["two"] * 10, 0.0), ("Dog?", ["dog"] * 5 + ["cat"] * 5, 1.0)]:
        assert ev.vqa_accuracy(pred, answers, "lmms_eval") == expected, (pred, answers)
    # both sides always, as raw JSONL answers may need
    assert ev.vqa_accuracy("2", ["two"] * 10, "normalize_both") == 1.0 and ev.vqa_accuracy("2", ["two"] * 10) == 0.0
    assert ev.vqa_accuracy("The Dog.", ["dog"], "normalize_both") == 1.0 and ev.vqa_accuracy("dogs", ["dog"], "normalize_both") == 0.0
    # one answer, where the script has no other annotator to count: an exact match after the convention's processing
    assert ev.vqa_accuracy(" dog\n", ["dog"]) == 1.0 and ev.vqa_accuracy("The Dog.", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="vqa_convention='official'"):
        ev.vqa_accuracy("dog", ["dog"], "official")


class ScriptedModel:
    """Gives one fixed reply to every question; images pass through untouched."""
    device = torch.device("cpu")

    def __init__(self, reply):
        self.reply = reply

    def preprocess(self, images):
        return torch.stack(list(images))

    def image_embeds(self, px):
        return px

    def answer(self, embeds, questions):
        return [self.reply] * len(questions)


def test_understanding_is_exact_match_on_the_world_and_vqa_accuracy_on_real_data():
    sample = {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "question": "how many shapes are there?",
              "answers": ["2"], "attrs": {"objects": []}}
    real = dict(sample, answers=["2"] * 3 + ["3"] * 7, attrs=None)
    assert ev.understanding_accuracy(ScriptedModel("Two"), [sample], progress=False) == 0.0
    assert ev.understanding_accuracy(ScriptedModel("Two"), [real, real], progress=False) == pytest.approx(0.9)


# ---------------------------------------------------------------- the axes: answers read from the scene, consistency

class OracleModel(ScriptedModel):
    """Reads each image with the oracle and answers from what it sees: right on every true picture."""

    def __init__(self):
        pass

    def answer(self, embeds, questions):
        return [ev.answer_from_attrs(q, data.read_attrs(im)) for im, q in zip(embeds, questions)]


def test_answer_from_attrs_answers_every_world_question_from_the_scene_or_its_oracle_reading():
    for r in world("test", 200):
        assert ev.answer_from_attrs(r["question"], r["attrs"]) == r["answers"][0]
        assert ev.answer_from_attrs(r["question"], data.read_attrs(r["image"])) == r["answers"][0]
    assert ev.answer_from_attrs("what color is the circle?", {"objects": []}) is None
    with pytest.raises(ValueError, match="not a question"):
        ev.answer_from_attrs("what is this?", {"objects": []})


def test_consistency_is_one_for_a_truthful_model_and_drops_when_images_mismatch_captions():
    recs = world("test", 12)
    images = [r["image"] for r in recs]
    assert ev.consistency_score(OracleModel(), images, recs, batch_size=5, progress=False) == 1.0
    shifted = images[1:] + images[:1]  # each caption's questions asked of the next caption's picture
    assert ev.consistency_score(OracleModel(), shifted, recs, batch_size=5, progress=False) < 0.8


def test_consistency_equals_asking_each_question_of_the_generated_image_alone(shapes_base):
    recs = world("test", 3)
    images = ev.generate_images(shapes_base, recs, batch_size=3, progress=False)
    assert len(images) == 3 and images[0].dtype == torch.uint8
    direct = []
    with torch.no_grad():
        for im, r in zip(images, recs):
            emb = shapes_base.image_embeds(shapes_base.preprocess([im]))
            direct += [shapes_base.answer(emb, [q])[0] == a for q, a in data.caption_qa(r["attrs"])]
    got = ev.consistency_score(shapes_base, images, recs, batch_size=4, progress=False)
    assert got == pytest.approx(sum(direct) / len(direct))


# ---------------------------------------------------------------- robustness

@pytest.mark.parametrize("at", ["vq", "aligner"])
def test_pgd_at_the_interface_raises_the_answer_loss_within_the_budget(shapes_base, at):
    recs = world("test", 8)
    qs, ans = [r["question"] for r in recs], [r["answers"][0] for r in recs]
    with torch.no_grad():
        z = shapes_base.visual_tokens(shapes_base.preprocess([r["image"] for r in recs]), at)
    delta = ev.pgd_delta(shapes_base, z, qs, ans, at, eps=0.3, relative=True, steps=5, generator=gen(0))
    assert (token_norms(delta) <= 0.3 * token_norms(z) * (1 + 1e-5)).all()
    with torch.no_grad():
        ce = {name: shapes_base.answer_loss(shapes_base.perturbed_view(z + d, at)[0], qs, ans).mean().item()
              for name, d in [("zero", torch.zeros_like(z)), ("random", random_like(z, 0.3, generator=gen(1))), ("pgd", delta)]}
    assert ce["pgd"] > max(ce["zero"], ce["random"]) + 0.05, ce


def test_adversarial_accuracy_is_below_clean_accuracy_on_the_base(shapes_base):
    recs = world("test", 16)
    res = ev.adversarial_accuracy(shapes_base, recs, "aligner", eps=0.3, relative=True, steps=5, batch_size=8, progress=False)
    clean = ev.understanding_accuracy(shapes_base, recs, progress=False)
    assert res["accuracy_zero_delta"] == clean  # at 'aligner' the view with δ = 0 is the clean one
    assert res["ce_attacked"] > res["ce_zero_delta"] + 0.1 and res["accuracy"] < clean, res


def test_the_tables_attack_row_reads_the_first_attack_n_samples_without_the_zero_delta_pass(shapes_base):
    recs = world("test", 12)
    attack = dict(eps=0.3, relative=True, steps=2, batch_size=4)
    full = ev.adversarial_accuracy(shapes_base, recs[:8], "aligner", progress=False, **attack)
    alone = ev.adversarial_accuracy(shapes_base, recs[:8], "aligner", progress=False, baseline=False, **attack)
    assert alone["accuracy"] == full["accuracy"] and alone["scores"] == full["scores"]  # the same attack, the same draws
    assert alone["accuracy_zero_delta"] is None and full["accuracy_zero_delta"] is not None
    res = ev.summary(shapes_base, recs, at="aligner", attack={k: v for k, v in attack.items() if k != "batch_size"}, attack_n=8,
                     progress=False)
    assert res == {"clean": ev.understanding_accuracy(shapes_base, recs, progress=False), "under_pgd_2_steps_on_8": pytest.approx(
        ev.adversarial_accuracy(shapes_base, recs[:8], "aligner", eps=0.3, steps=2, progress=False)["accuracy"])}
    assert "under_pgd_1_steps" in ev.summary(shapes_base, recs[:4], at="aligner", attack=dict(eps=0.3, steps=1), attack_n=8, progress=False)


def test_the_oracle_tells_which_attacked_images_keep_their_scene(shapes_base):
    recs = world("test", 16)
    tiny, large = (ev.adversarial_accuracy(shapes_base, recs, "vq", eps=e, steps=3, batch_size=8, progress=False) for e in (1e-6, 1.0))
    with torch.no_grad():  # at a vanishing budget, the attacked image is the VQ reconstruction
        recon = shapes_base.vq_decode(shapes_base.project_to_codebook(shapes_base.visual_tokens(ev._pixels(shapes_base, recs), "vq"))[0])
    assert tiny["scene_kept"] == [data.oracle_score(im, r["attrs"]) for im, r in zip(shapes_base.to_uint8(recon.clamp(-1, 1)), recs)]
    assert len(large["scene_kept"]) == 16 and sum(large["scene_kept"]) < sum(tiny["scene_kept"])  # a budget that redraws scenes


def test_pixel_attack_of_zero_budget_changes_nothing_and_of_a_real_one_lowers_accuracy(shapes_base):
    recs = world("test", 16)
    clean = ev.understanding_scores(shapes_base, recs, progress=False)
    assert ev.pixel_adversarial_scores(shapes_base, recs, eps=0.0, steps=2, progress=False) == clean
    attacked = ev.pixel_adversarial_scores(shapes_base, recs, eps=16 / 255, steps=5, progress=False)
    assert len(attacked) == 16 and sum(attacked) < sum(clean)


# ---------------------------------------------------------------- the checkpoint's own perturber

def fake_run(path, perturber=None, stepped=True, model=SHAPES_BASE, items=(), **config):
    """A training out_dir as train.py lays it out: ckpt/ with ckpt.json (config), state.safetensors
    (perturber.* tensors), optim.safetensors (perturber moments when it `stepped`) and the hard buffer;
    the model is referred to by its (absolute) path."""
    ck = path / "ckpt"
    ck.mkdir(parents=True)
    cfg = {"game": True, "perturb_at": "vq", "eps_min": 0.0, "eps_max": 0.25, "eps_relative": True, "buffer_rule": "consistent",
           "tau": 0.9, "q_hard": 0.75, "clip_path": "", "mine": "decode", **config}
    with open(ck / "ckpt.json", "w") as f:
        json.dump({"iter_num": 3, "config": cfg, "model": model}, f)
    perturber = perturber or Perturber(8, eps_max=0.25, eps_init=0.2)
    save_file({f"perturber.{k}": v.contiguous() for k, v in perturber.state_dict().items()}, str(ck / "state.safetensors"))
    save_file({"perturber.theta_eps.exp_avg": torch.zeros(())} if stepped else {"lora_A.exp_avg": torch.zeros(1)},
              str(ck / "optim.safetensors"))
    checkpoint.write_state(str(ck), "buffer0", {"capacity": 4096, "temperature": 1.75, "items": list(items),
                                                 "H": torch.linspace(2.0, 1.0, len(items), dtype=torch.float64)})
    return ck


def test_own_perturber_from_a_checkpoint_or_an_export_and_none_for_sft_or_a_bare_model(small_dir, tmp_path):
    torch.manual_seed(0)
    p = Perturber(8, eps_max=0.25, eps_init=0.2)
    with torch.no_grad():
        p.theta_eps.fill_(0.4)  # a learned budget, away from eps_init
    ck = fake_run(tmp_path / "game", p)
    z = torch.randn(2, 5, 8)
    for path in (tmp_path / "game", ck):  # the out_dir or its ckpt/
        again, info = ev.own_perturber(str(path))
        assert torch.equal(again(z), p(z)) and info["eps"] == pytest.approx(p.eps.item())
        assert (info["perturb_at"], info["eps_max"], info["relative"]) == ("vq", 0.25, True)
    fake_run(tmp_path / "sft", p, stepped=False, game=False)
    none, why = ev.own_perturber(str(tmp_path / "sft"))
    assert none is None and "never trained" in why
    none, why = ev.own_perturber(small_dir)
    assert none is None and "no perturber.safetensors" in why
    # a standalone export beside a model (model.save_perturber): its budget comes with it
    shutil.copytree(small_dir, tmp_path / "export")
    q = Perturber(64, eps_max=0.02, eps_init=0.01, relative=False)
    save_perturber(q, str(tmp_path / "export"), perturb_at="aligner")
    again, info = ev.own_perturber(str(tmp_path / "export"))
    z = torch.randn(2, 5, 64)
    assert torch.equal(again(z), q(z)) and (info["perturb_at"], info["eps_max"], info["relative"]) == ("aligner", 0.02, False)
    assert ev.trained_budget(str(tmp_path / "export"))["from"].endswith("perturber.json")


# ---------------------------------------------------------------- label preservation

def test_label_preservation_decodes_buffered_codes_and_rereads_them_with_the_oracle(shapes_base, tmp_path):
    recs = [r for r in data.shapes_world("train", 20, seed=0) if r["answers"][0] != "no"][:8]
    with torch.no_grad():
        codes = shapes_base.image_codes(shapes_base.preprocess([r["image"] for r in recs]))
        black = shapes_base.image_codes(shapes_base.preprocess([torch.zeros(3, 32, 32, dtype=torch.uint8)]))[0]
    # six faithful items, two whose codes are an empty picture: their labels (never "no") no longer hold
    items = [{"codes": (codes[i] if i < 6 else black).clone(), "question": r["question"], "answer": r["answers"][0],
              "source": r["source"]} for i, r in enumerate(recs)]
    fake_run(tmp_path / "run", items=items, buffer_rule="published")
    res = ev.label_preservation(str(tmp_path / "run"), progress=False)
    assert (res["count"], res["buffer_size"], res["buffer_rule"]) == (8, 8, "published")
    assert res["label_preservation"] == 0.75 and res["scene_preservation"] == 0.75
    items[0]["source"] = recs[1]["source"]  # a source that does not match its question
    fake_run(tmp_path / "bad", items=items)
    with pytest.raises(SystemExit, match="another seed"):
        ev.label_preservation(str(tmp_path / "bad"), progress=False)
    fake_run(tmp_path / "empty")
    assert ev.label_preservation(str(tmp_path / "empty"), progress=False)["note"] == "the buffer is empty"


# ---------------------------------------------------------------- --compare

def write_eval(path, **figures):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "eval.json"), "w") as f:
        json.dump({**figures, "data": "shapes", "settings": {"n": 8}}, f)


def test_compare_prints_runs_side_by_side_with_deltas_and_averages_each_glob(tmp_path):
    for s, (u, a) in enumerate([(0.60, 0.30), (0.62, 0.34), (0.64, 0.32)]):
        write_eval(tmp_path / f"sft-s{s}", understanding=u, robustness_adv=a)
        write_eval(tmp_path / f"unigame-s{s}", understanding=u + 0.01, robustness_adv=a + 0.05, understanding_own_perturber=0.5)
    table = ev.compare([str(tmp_path / "sft-s*"), str(tmp_path / "unigame-s*")])
    rows = {line.split()[0]: line for line in table.splitlines()}
    # sample standard deviation of 0.60, 0.62, 0.64 is 0.02
    assert "0.620 ± 0.020" in rows["understanding"] and "0.630 ± 0.020" in rows["understanding"]
    assert rows["understanding"].endswith("+0.010") and rows["robustness_adv"].endswith("+0.050")
    assert "0.320 ± 0.020" in rows["robustness_adv"] and rows["understanding_own_perturber"].endswith("—")
    assert "(3 runs)" in table and "settings" not in rows and "data" not in rows
    r = subprocess.run([sys.executable, "eval.py", "--compare", str(tmp_path / "sft-s0"), str(tmp_path / "unigame-s2")],
                       capture_output=True, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert rows["understanding"].split()[-3:] == ["0.600", "0.650", "+0.050"]
    assert rows["robustness_adv"].split()[-3:] == ["0.300", "0.370", "+0.070"]
    with pytest.raises(SystemExit, match="no eval.json"):
        ev.compare([str(tmp_path / "nothing-*")])


def test_compare_gives_paired_differences_with_a_bootstrap_interval(tmp_path):
    for s in range(2):
        base = [1.0] * 20 + [0.0] * 20
        write_eval(tmp_path / f"a-s{s}", robustness_adv=0.5, per_sample={"robustness_adv": base})
        write_eval(tmp_path / f"b-s{s}", robustness_adv=0.6, per_sample={"robustness_adv": base[:20] + [1.0] * 4 + [0.0] * 16})
    table = ev.compare([str(tmp_path / "a-s*"), str(tmp_path / "b-s*")])
    line = next(x for x in table.splitlines() if x.startswith("robustness_adv ") and "−" in x)
    mean, lo, hi = (float(v) for v in re.search(r": ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", line).groups())
    assert mean == pytest.approx(0.1) and 0 < lo < mean < hi and "per run: +0.100, +0.100" in line


def test_compare_reads_each_runs_training_cost_from_its_log_and_plots_robustness_against_it(tmp_path):
    for arm, x in [("sft", 0.5), ("pgd", 3.0)]:
        for s in range(2):
            write_eval(tmp_path / f"{arm}-s{s}", robustness_adv=0.6 + 0.05 * s)
            (tmp_path / f"{arm}-s{s}" / "log.jsonl").write_text(
                "".join(json.dumps({"iter": i, "ms": {"step": 900 * x}, "cpu_ms": {"step": 1000 * x}}) + "\n" for i in range(3)))
    table = ev.compare([str(tmp_path / "sft-s*"), str(tmp_path / "pgd-s*")], plot=str(tmp_path / "cost.png"))
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert rows["train_cpu_s_per_step"].endswith("+2.500") and "0.450" in rows["train_s_per_step"]
    assert Image.open(tmp_path / "cost.png").size == (560, 380)


# ---------------------------------------------------------------- pictures: --show, --curves, --bars (pictures.py)
# What is checked is that the files are written, are PNGs, and have their grid's size (rows x columns), not their pixels.

def is_png(path, size):
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", size), (path, im.format, im.size)
        im.verify()
    return True


def run_eval(monkeypatch, *argv):
    """eval.py's command line in this process (a fresh interpreter would spend most of the time importing)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *map(str, argv)])
    with pytest.raises(SystemExit) as stop:  # --show, --curves and --compare end with sys.exit(0)
        runpy.run_path(os.path.join(HERE, "eval.py"), run_name="__main__")
    assert stop.value.code in (0, None), stop.value.code


def test_show_draws_samples_of_a_model_an_export_and_a_training_run_and_the_runs_hard_buffer(small_dir, tmp_path, monkeypatch):
    small = ev.load(small_dir, "cpu")
    recs = data.shapes_world("train", 3, seed=0)
    with torch.no_grad():
        codes = small.image_codes(small.preprocess([r["image"] for r in recs]))
    items = [{"codes": codes[i].clone(), "question": r["question"], "answer": r["answers"][0], "source": r["source"]}
             for i, r in enumerate(recs)]
    items[0].update(ce=1.5, s=0.97)  # as train.py stores them at mining; the other two, as an older run's, are computed now
    fake_run(tmp_path / "run", model=small_dir, items=items)
    shutil.copytree(small_dir, tmp_path / "export")
    save_perturber(Perturber(8, eps_max=0.25, eps_init=0.2), str(tmp_path / "export"), perturb_at="vq")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the grids need pillow only
    rows = 2
    for name, ckpt in [("model", small_dir), ("export", tmp_path / "export"), ("run", tmp_path / "run")]:
        run_eval(monkeypatch, f"--ckpt={ckpt}", f"--show={tmp_path / name}-pictures", f"--show_n={rows}", "--n=4", "--adv_steps=1",
                 "--batch_size=4", "--device=cpu")
        # six columns: clean, VQ reconstruction, its perturber, PGD, random delta, the image of the caption
        assert is_png(tmp_path / f"{name}-pictures" / "samples.png", (6 * pictures.CELL_W, pictures.TOP + rows * pictures.CELL_H + pictures.FOOT))
        assert (tmp_path / f"{name}-pictures" / "buffer.png").exists() == (name == "run")
    # the buffer's hardest show_n items (all 3 here), ITEMS_PER_ROW a row
    assert is_png(tmp_path / "run-pictures" / "buffer.png", (pictures.ITEMS_PER_ROW * pictures.ITEM_W, pictures.TOP + pictures.ITEM_H + pictures.FOOT))
    views = pictures.buffer_views(small, items, torch.tensor([3.0, 2.0, 1.0]))
    assert [v["when"] for v in views] == ["at mining", "now", "now"] and (views[0]["ce"], views[0]["s"], views[2]["H"]) == (1.5, 0.97, 1.0)
    assert all(v["picture"].shape == v["source"].shape == (3, 32, 32) and -1 <= v["s"] <= 1 for v in views)
    columns = pictures.sample_views(small, recs[:2], Perturber(8, eps_max=0.25, eps_init=0.2), steps=1)
    assert [h.split(",")[0] for h, _ in columns] == ["clean", "VQ reconstruction", "its perturber", "PGD", "random delta", "image of the caption"]
    assert all(v["image"].shape == (3, 32, 32) and isinstance(v["answer"], str) for _, vs in columns for v in vs)


def test_the_mining_log_round_trips_into_the_hardness_histogram_and_resumes_as_one_run(small_dir, tmp_path):
    args = ["--mine_log=True", "--q_hard=0.5", "--hard_bs=1", "--tau=-1.0"]  # the buffer keeps items: 4 samples x 2 candidates a step
    quick_train(small_dir, tmp_path, "--max_iters=2", *args)
    cands = pictures.read_mine_log(str(tmp_path))
    assert len(cands) == 2 * 4 * 2  # steps x batch x candidates per sample
    for r in read_log(tmp_path):
        if "kept" in r:  # each step's candidates, and those kept, as the log counts them
            mined = [c for c in cands if c["iter"] == r["iter"]]
            assert sum(c["kept"] for c in mined) == r["kept"] and sorted({c["k"] for c in mined}) == [0, 1]
            assert all(c["H"] == pytest.approx(c["ce"]) and -1 <= c["s"] <= 1 for c in mined)  # tau -1: H = CE
    edges, every, kept = pictures.hardness_histogram(cands)
    assert every.sum() == len(cands) and kept.sum() == sum(c["kept"] for c in cands) > 0 and len(edges) == len(every) + 1
    # the buffer's items carry the CE and s they were mined with
    items = json.load(open(tmp_path / "ckpt" / "buffer0.json"))["items"]
    assert items and all((it["source"], it["ce"], it["s"]) in {(c["source"], c["ce"], c["s"]) for c in cands if c["kept"]} for it in items)
    # resumed, the mining log reads as one run: what a killed run wrote after the checkpoint is dropped, a torn line too
    with open(tmp_path / "mining0.jsonl", "a") as f:
        f.write(json.dumps({"iter": 3, "source": "after the checkpoint", "k": 0, "ce": 0, "s": 0, "H": 0, "kept": False}) + '\n{"iter": 3, "so')
    quick_train(small_dir, tmp_path, "--init_from=resume", "--max_iters=3", *args)
    cands = pictures.read_mine_log(str(tmp_path))
    assert [sum(c["iter"] == i for c in cands) for i in (1, 2, 3)] == [8, 8, 8] and "after the checkpoint" not in {c["source"] for c in cands}


def test_curves_of_a_game_and_an_sft_log_its_mining_log_and_compare_as_bars_are_drawn(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # optional: .ci/run installs it, so there these run
    game = [{"iter": i, "loss": 1.0, "und": 0.1, "adv": 0.2, "adv_start": 0.15, "eps": 0.15 + 0.01 * i, "changed": 0.6, "buffer": 4 * i,
             "kept": 4, "hard": 0.5, "n_hard": 2} for i in (1, 2, 3)] + [{"iter": 3, "summary": {"before": {"clean": 0.9}, "after": {"clean": 0.95}}}]
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in game))
    for step in (1, 2, 3):  # as train.py --mine_log=True writes it: 2 samples x 2 candidates a step, the hardest kept
        ce = torch.tensor([0.1, 0.2, 0.3, 0.4]) * step
        checkpoint.log_candidates(str(tmp_path / "game" / "mining0.jsonl"), step, ["shapes/train/0", "shapes/train/1"], ce,
                                torch.full((4,), 0.95), ce, torch.tensor([3]))
    run_eval(monkeypatch, f"--curves={tmp_path / 'game'}", f"--show={tmp_path / 'pictures'}")
    assert is_png(tmp_path / "pictures" / "curves.png", (960, 512)) and is_png(tmp_path / "pictures" / "hardness.png", (960, 288))
    assert [(c["iter"], c["source"], c["k"], c["kept"]) for c in pictures.read_mine_log(str(tmp_path / "game"))][2:4] == \
        [(1, "shapes/train/0", 1, False), (1, "shapes/train/1", 1, True)]
    for arm, u in [("sft", 0.60), ("unigame", 0.62)]:
        for s in range(2):
            write_eval(tmp_path / f"{arm}-s{s}", understanding=u + 0.01 * s, robustness_adv=u - 0.2, consistency=0.5)
    run_eval(monkeypatch, "--compare", tmp_path / "sft-s*", tmp_path / "unigame-s*", f"--bars={tmp_path / 'bars.png'}")
    assert is_png(tmp_path / "bars.png", (960, 360))
    log = [{"iter": i, "loss": 1.0 / i, "und": 1.0 / i} for i in (1, 2, 3)]
    log += [{"iter": 2, "skipped_update": ["loss=nan"], "bad_steps": 1}, {"iter": 3, "eval": {"understanding": 0.5}}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"iter": 4, "lo')  # and a line torn by a kill
    assert pictures.curves(str(tmp_path / "sft.jsonl"), str(tmp_path / "c")) == [str(tmp_path / "c" / "curves.png")]  # no mining log
    assert is_png(tmp_path / "c" / "curves.png", (960, 512))


def test_plots_without_matplotlib_stop_with_one_line_naming_the_install(tmp_path, monkeypatch):
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0, "und": 1.0}) + "\n")
    write_eval(tmp_path / "a", understanding=0.5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    for draw in (lambda: pictures.curves(str(tmp_path), str(tmp_path / "out")),
                 lambda: ev.compare([str(tmp_path / "a")], bars=str(tmp_path / "bars.png"))):
        with pytest.raises(SystemExit, match=r"^plotting needs matplotlib, an optional dependency: pip install matplotlib$"):
            draw()
    assert not (tmp_path / "out").exists() and not (tmp_path / "bars.png").exists()
    with pytest.raises(SystemExit, match="no log.jsonl"):
        pictures.curves(str(tmp_path / "a"), str(tmp_path / "out"))


# ---------------------------------------------------------------- eval.py end to end

def test_eval_writes_every_axis_as_a_fraction_with_the_attack_recorded(small_dir, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    fake_run(tmp_path / "run", model=small_dir)
    # the command line, run in this process (a fresh interpreter would spend most of the time importing)
    monkeypatch.setattr(sys, "argv", ["eval.py", f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'ev'}", "--n=6",
                                      "--gen_n=2", "--adv_n=3", "--adv_steps=2", "--batch_size=4", "--device=cpu"])
    runpy.run_path(os.path.join(HERE, "eval.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    out = json.load(open(tmp_path / "ev" / "eval.json"))
    axes = ["understanding", "generation", "consistency", "robustness_ood", "robustness_adv", "understanding_random_perturb",
            "understanding_own_perturber", "reconstruction", "robustness_adv_scene_kept", "robustness_adv_where_kept"]
    assert all(0.0 <= out[k] <= 1.0 for k in axes), out
    attack = out["robustness_adv_attack"]
    assert {k: attack[k] for k in ("perturb_at", "eps", "relative", "steps", "n")} == \
        {"perturb_at": "vq", "eps": 0.25, "relative": True, "steps": 2, "n": 3}  # the budget the run was trained with
    assert attack["step_size"] == pytest.approx(2.5 * 0.25 / 2)
    assert out["data"] == "shapes" and out["own_perturber"]["eps"] == pytest.approx(0.2) and out["skipped"] == {}
    assert all(k in stdout for k in axes)


def test_eval_on_a_manifest_stops_at_an_unreadable_image_named_or_skips_it_and_counts_it(small_dir, tmp_path, monkeypatch, capsys):
    manifest, _ = shapes_manifest(tmp_path, 5)
    (path,) = spoil_lines(tmp_path, [2])
    fake_run(tmp_path / "run", model=small_dir, prompt_suffix=SUFFIX)  # trained with the short-answer suffix
    argv = ["eval.py", f"--ckpt={tmp_path / 'run'}", f"--out_dir={tmp_path / 'ev'}", "--data=jsonl", f"--jsonl_path={manifest}",
            "--n=3", "--adv_n=2", "--adv_steps=1", "--batch_size=4", "--device=cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, "eval.py"), run_name="__main__")
    assert re.fullmatch(rf"data error: m\.jsonl line 2: {re.escape(path)}: cannot decode image .* "
                        r"\(skip_bad=True skips and counts such samples\)", str(e.value)), str(e.value)
    monkeypatch.setattr(sys, "argv", argv + ["--skip_bad=True"])
    runpy.run_path(os.path.join(HERE, "eval.py"), run_name="__main__")
    out = json.load(open(tmp_path / "ev" / "eval.json"))
    assert len(out["per_sample"]["understanding"]) == 3 and out["settings"]["n"] == 3  # lines 1, 3, 4: the first 3 readable
    assert (out["settings"]["prompt_suffix"], out["settings"]["vqa_convention"], out["settings"]["answer_tokens"]) == (SUFFIX, "vqaeval", 16)
    assert out["settings"]["skipped_samples"] == 1
    assert f"skipped 1 bad sample when reading the data: m.jsonl line 2 (first: {path}: cannot decode image" in capsys.readouterr().out


# ================================================================================================
# checkpoints and faults: checkpoint.py through train.py: resume, kills, corrupt files, NaN, bad data, no pickles
# The faults a long run must survive, each tried for real on train.py with tiny settings (train_cmd, run_cmd:
# see configuration): a SIGKILL, a kill during a checkpoint's swap, a torn or corrupt checkpoint, NaN losses,
# corrupt images mid-epoch.

# ---------------------------------------------------------------- resume

def test_a_short_run_checkpoints_and_resume_continues(small_dir, tmp_path):
    """A resumed run says from which checkpoint and step, and that the learning-rate schedule now ends at the new
    max_iters; its end report counts the steps it trained itself and gives its figures at the checkpoint."""
    quick_train(small_dir, tmp_path, "--max_iters=2", "--tau=-1.0")
    meta = json.load(open(tmp_path / "ckpt" / "ckpt.json"))
    assert meta["iter_num"] == 2 and meta["config"]["lora_r"] == 4
    JanusForConditionalGeneration.from_pretrained(tmp_path / "ckpt" / "model")  # the merged export loads alone
    at_checkpoint = read_log(tmp_path)[-1]["summary"]["after"]
    out = quick_train(small_dir, tmp_path, "--init_from=resume", "--max_iters=4", "--tau=-1.0")
    iters = [r["iter"] for r in read_log(tmp_path) if "loss" in r]
    assert iters == [1, 2, 3, 4]  # continued from step 2, not from scratch
    assert json.load(open(tmp_path / "ckpt" / "ckpt.json"))["iter_num"] == 4
    assert f"resumed from {tmp_path / 'ckpt'} at iter 2: the learning-rate schedule now ends at max_iters=4 " \
           "(at 2 in the run that wrote the checkpoint)" in out, out
    assert "done: 2 iterations (iter 2 to 4)" in out and "nan" not in out, out
    table = out[out.index("eval samples"):].splitlines()
    assert table[0].split()[-4:] == ["at", "iter", "2", "after"]
    summary = read_log(tmp_path)[-1]["summary"]
    assert summary["before"] == at_checkpoint and summary["before_iter"] == 2  # the figures at the resumed checkpoint
    assert [float(x) for x in table[1].split()[1:]] == [round(at_checkpoint["clean"], 3), round(summary["after"]["clean"], 3)]


def differing_tensors(a, b):
    """Names of the tensors in which two safetensors files differ (or that only one holds)."""
    a, b = load_file(a), load_file(b)
    return sorted(a.keys() ^ b.keys()) + [k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])]


def test_a_killed_run_resumes_bitwise_equal_to_an_uninterrupted_one(small_dir, tmp_path):
    """SIGKILL after the step-3 checkpoint, resume to step 7: LoRA, perturber, both AdamW states, the hard
    buffer, RNG, data position and every later loss equal those of a run never stopped, bit for bit. The
    data crosses an epoch boundary after the kill, mid-epoch resumption included."""
    args = ["--max_iters=7", "--ckpt_interval=3"]
    whole_log = open(tmp_path / "whole.out", "w")  # a file, not a pipe: nobody reads it while the run goes on
    whole = subprocess.Popen(train_cmd(small_dir, tmp_path / "whole", *args), cwd=HERE, env=ENV,
                             stdout=whole_log, stderr=subprocess.STDOUT)
    killed = subprocess.Popen(train_cmd(small_dir, tmp_path / "killed", *args), cwd=HERE, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "killed" / "ckpt" / "ckpt.json"
    deadline = time.time() + 240
    while killed.poll() is None and not meta.exists() and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.returncode  # killed mid-run, after the step-3 checkpoint
    assert json.load(open(meta))["iter_num"] == 3, [r["iter"] for r in read_log(tmp_path / "killed") if "loss" in r]
    code, out = run_cmd(train_cmd(small_dir, tmp_path / "killed", *args, "--init_from=resume"))
    assert code == 0, out[-3000:]
    assert whole.wait(timeout=240) == 0, open(tmp_path / "whole.out").read()[-3000:]

    a, b = tmp_path / "whole" / "ckpt", tmp_path / "killed" / "ckpt"
    assert json.load(open(a / "ckpt.json"))["iter_num"] == json.load(open(b / "ckpt.json"))["iter_num"] == 7
    for name in ("state.safetensors", "optim.safetensors", "buffer0.safetensors", "rank0.safetensors"):  # params | moments | buffer | RNG
        assert not differing_tensors(a / name, b / name), (name, differing_tensors(a / name, b / name)[:5])
    items = json.load(open(a / "buffer0.json"))["items"]
    assert items == json.load(open(b / "buffer0.json"))["items"] and len(items) > 5  # the buffer's questions, answers, sources
    places = [{k: v for k, v in json.load(open(d / "rank0.json")).items() if k != "rng"} for d in (a, b)]
    assert places[0] == places[1] == {"data_position": [1, 3], "skipped": []}
    # the log too: the resumed run dropped what the killed one logged after its checkpoint
    steps = [[{k: v for k, v in r.items() if k not in ("time", "ms", "cpu_ms")} for r in read_log(d) if "loss" in r] for d in (a.parent, b.parent)]
    assert [r["iter"] for r in steps[1]] == [1, 2, 3, 4, 5, 6, 7] and steps[0] == steps[1]


# ---------------------------------------------------------------- a kill mid-swap, corrupt files, non-finite values

@pytest.fixture(scope="module")
def two_steps(small_dir, tmp_path_factory):
    """An out_dir holding the checkpoint of a 2-step run."""
    out = tmp_path_factory.mktemp("two_steps")
    code, log = run_cmd(train_cmd(small_dir, out, "--max_iters=2"))
    assert code == 0, log[-3000:]
    return out


def test_a_kill_during_the_checkpoint_swap_leaves_a_checkpoint_to_resume_from(small_dir, two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    # killed between checkpoint.save's renames (ckpt -> ckpt.old done, ckpt.tmp -> ckpt not yet), and a
    # later save killed while writing ckpt.tmp
    os.rename(tmp_path / "ckpt", tmp_path / "ckpt.old")
    (tmp_path / "ckpt.tmp").mkdir()
    (tmp_path / "ckpt.tmp" / "state.safetensors").write_bytes(b"\0" * 10)
    with open(tmp_path / "log.jsonl", "a") as f:  # what it logged after its checkpoint, the last line torn by the kill
        f.write(json.dumps({"iter": 3, "loss": 1.0, "fake": True}) + "\n" + '{"iter": 4, "loss": 1.0, "fa')
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=3", "--init_from=resume"))
    assert code == 0, out[-3000:]
    assert [r["iter"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3]  # went on from step 2
    assert "fake" not in (tmp_path / "log.jsonl").read_text()  # the killed run's lines after its checkpoint went
    assert json.load(open(tmp_path / "ckpt" / "ckpt.json"))["iter_num"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "log.jsonl"]  # ckpt.old and the torn ckpt.tmp are gone


@pytest.mark.parametrize("name, spoil", [
    ("ckpt.json", lambda b: b[:len(b) // 2]),  # truncated JSON
    ("state.safetensors", lambda b: b[:len(b) // 2]),  # truncated tensors
    ("optim.safetensors", lambda b: b"\xff" * len(b)),  # garbage of the right size
    ("buffer0.json", lambda b: b"[" + b" " * (len(b) - 1)),  # malformed JSON of the right size
])
def test_a_truncated_or_corrupt_checkpoint_is_reported_in_one_line_naming_the_file(small_dir, two_steps, tmp_path, name, spoil):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "ckpt" / name
    path.write_bytes(spoil(path.read_bytes()))
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=3", "--init_from=resume"))
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert last_line(out).startswith(f"cannot resume: {path}: "), out[-1000:]


def test_nan_losses_skip_both_updates_and_too_many_in_a_row_stop_the_run(small_dir, tmp_path):
    # NaN at step 2 (skipped, the run goes on), step 3 good, NaN at 4 and 5: two in a row, stop at 5
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=8", "--ckpt_interval=1", "--debug_nan_at=2,4,5",
                                  "--max_bad_steps=2"))
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert last_line(out).startswith("stopping at iter 5: 2 steps in a row with non-finite values (this one: loss_G=nan"), out[-1000:]
    log = read_log(tmp_path)
    bad = [r for r in log if "skipped_update" in r]
    assert [(r["iter"], r["bad_steps"]) for r in bad] == [(2, 1), (4, 2), (5, 3)]
    assert all(r["skipped_update"] == ["loss_G=nan", "grad_norm_G=nan", "loss=nan", "grad_norm=nan"] for r in bad)
    assert log[-1]["iter"] == 5 and "stopped" in log[-1]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4]  # step 5 stopped the run before its log line
    # the last good checkpoint, step 4's, is intact; both players updated at steps 1 and 3 only
    meta = json.load(open(tmp_path / "ckpt" / "ckpt.json"))
    assert (meta["iter_num"], meta["bad_steps"], meta["bad_in_row"]) == (4, 2, 1)
    moments = load_file(tmp_path / "ckpt" / "optim.safetensors")
    adam_steps = {k: v.item() for k, v in moments.items() if k.endswith(".step")}
    assert any(k.startswith("perturber.") for k in adam_steps) and set(adam_steps.values()) == {2.0}
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "ckpt" / "state.safetensors").values())
    assert all(torch.isfinite(v).all() for v in moments.values())


def test_a_checkpoint_is_never_written_with_non_finite_values_and_the_previous_one_stays(small_dir, two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    # a non-finite value that no loss reveals: theta_eps = inf still gives the finite budget eps_max
    state = load_file(tmp_path / "ckpt" / "state.safetensors")
    state["perturber.theta_eps"] = torch.tensor(float("inf"))
    save_file(state, tmp_path / "ckpt" / "state.safetensors")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=3", "--init_from=resume"))
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert last_line(out) == (f"iter 3: not writing a checkpoint with non-finite values (in ['perturber.theta_eps']); "
                              f"{tmp_path}/ckpt is left as it was"), out[-1000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "log.jsonl"]


# ---------------------------------------------------------------- bad data mid-epoch

def shapes_manifest(folder, n):
    """A JSONL manifest of n shapes-world PNGs, one a line, and the numbers of the lines train.py holds out for
    evaluation with eval_n=4 (TINY): data.held_out's choice, which depends only on the manifest's images."""
    lines = []
    for i, s in enumerate(data.shapes_world("train", n, seed=0)):
        Image.fromarray(s["image"].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        lines.append({"image": f"{i}.png", "question": s["question"], "answers": s["answers"], "caption": s["caption"]})
    (folder / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    held = data.held_out(data.load_jsonl(str(folder / "m.jsonl")), 4)[1]
    return folder / "m.jsonl", [int(r["source"].split(":")[1]) for r in held]


def spoil_lines(folder, lines):
    """Spoil the images of these manifest lines where they lie, so that they are found bad only when read:
    a text file named .png, then a PNG cut in half, by turns. Returns their paths."""
    paths = []
    for j, n in enumerate(lines):
        path = folder / f"{n - 1}.png"
        png = path.read_bytes()
        path.write_bytes(b"not an image" if j % 2 == 0 else png[:len(png) // 2])
        paths.append(str(path))
    return paths


def test_corrupt_images_mid_epoch_are_skipped_and_counted_once_each_or_stop_the_run_named(small_dir, tmp_path):
    manifest, held = shapes_manifest(tmp_path, 16)  # 12 samples train: 3 steps an epoch
    bad = [n for n in range(1, 17) if n not in held][:2]
    paths = spoil_lines(tmp_path, bad)
    args = ["--dataset=jsonl", f"--jsonl_path={manifest}"]
    code, out = run_cmd(train_cmd(small_dir, tmp_path / "skip", *args, "--max_iters=6", "--skip_bad=True"))  # two epochs
    assert code == 0, out[-3000:]
    assert "evaluating on 4 held-out samples: every question on 4 images is left out of training, which keeps 12 of 16" in out
    assert f"skipped 2 bad samples in training, met 4 times in all: m.jsonl line {bad[0]}, m.jsonl line {bad[1]} (first: " \
           f"{paths[0]}: cannot decode image" in out, out[-3000:]
    assert [r["skipped"] for r in read_log(tmp_path / "skip") if "loss" in r][-1] == 4
    code, out = run_cmd(train_cmd(small_dir, tmp_path / "stop", *args, "--max_iters=3"))  # skip_bad=False
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert re.fullmatch(rf"data error: m\.jsonl line ({bad[0]}|{bad[1]}): {re.escape(str(tmp_path))}/\d+\.png: cannot decode image .* "
                        r"\(skip_bad=True skips and counts such samples\)", last_line(out)), out[-1000:]


def test_a_corrupt_image_in_the_evaluation_slice_is_left_out_and_counted_or_stops_the_run_named(small_dir, tmp_path):
    manifest, held = shapes_manifest(tmp_path, 16)
    (path,) = spoil_lines(tmp_path, held[1:2])
    args = ["--dataset=jsonl", f"--jsonl_path={manifest}", "--max_iters=1", "--eval_adv_steps=0"]
    code, out = run_cmd(train_cmd(small_dir, tmp_path / "stop", *args))  # skip_bad=False: stops before any evaluation or training
    assert code != 0 and "Traceback" not in out and not (tmp_path / "stop" / "log.jsonl").exists(), out[-3000:]
    assert re.fullmatch(rf"data error: m\.jsonl line {held[1]}: {re.escape(path)}: cannot decode image .* "
                        r"\(skip_bad=True skips and counts such samples\)", last_line(out)), out[-1000:]
    code, out = run_cmd(train_cmd(small_dir, tmp_path / "skip", *args, "--skip_bad=True"))
    assert code == 0, out[-3000:]
    assert f"left 1 unreadable image out of evaluation (m.jsonl line {held[1]}: {path}: cannot decode image" in out
    assert f"skipped 1 bad sample when reading the data: m.jsonl line {held[1]} (first: {path}: cannot decode image" in out
    assert "accuracy on 3 eval samples" in out
    assert read_log(tmp_path / "skip")[-1]["summary"]["eval_set"].startswith("3 held-out samples")


# ---------------------------------------------------------------- no pickles

def test_no_pickles_anywhere_every_torch_load_is_weights_only():
    for name in sorted(os.listdir(HERE)) + sorted(os.path.join("assets", f) for f in os.listdir(os.path.join(HERE, "assets"))):
        if name.endswith(".py"):
            for n, line in enumerate(open(os.path.join(HERE, name)), 1):
                assert not re.match(r"\s*(import pickle|from pickle|import dill)", line), f"{name}:{n}"
                if re.search(r"torch\.load\(", line):
                    assert "weights_only=True" in line, f"{name}:{n}: {line.strip()}"


# ================================================================================================
# DDP: ranks.py through train.py in two processes (torchrun)

def test_two_process_ddp_keeps_lora_and_perturber_identical_on_both_ranks(small_dir, tmp_path):
    out = quick_train(small_dir, tmp_path, "--max_iters=2", "--tau=-1.0", "--ddp_check_interval=1", nproc=2)
    assert "iter 2: parameters identical on all 2 ranks" in out


def test_ddp_checkpoints_hold_each_ranks_own_state_and_resume_with_ranks_in_agreement(small_dir, tmp_path):
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=2", "--ddp_check_interval=1", nproc=2))
    assert code == 0 and "iter 2: parameters identical on all 2 ranks" in out, out[-3000:]
    ckpt = tmp_path / "ckpt"
    assert json.load(open(ckpt / "ckpt.json"))["world_size"] == 2
    sources = [[item["source"] for item in json.load(open(ckpt / f"buffer{r}.json"))["items"]] for r in (0, 1)]
    assert sources[0] and sources[1] and not set(sources[0]) & set(sources[1])  # each rank mined its own shard
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=3", "--ddp_check_interval=1", "--init_from=resume", nproc=2))
    assert code == 0 and "iter 3: parameters identical on all 2 ranks" in out, out[-3000:]
    code, out = run_cmd(train_cmd(small_dir, tmp_path, "--max_iters=4", "--init_from=resume"))  # one process: refused, named
    assert code != 0 and last_line(out).startswith(f"cannot resume: {ckpt} was written by 2 processes, this run has 1"), out[-1000:]


def test_a_failing_ddp_rank_brings_the_job_down_with_its_error_instead_of_hanging(small_dir, tmp_path):
    manifest, held = shapes_manifest(tmp_path, 20)  # 16 samples train, 8 a rank: one rank meets the corrupt image, one does not
    (path,) = spoil_lines(tmp_path, [min(set(range(1, 21)) - set(held))])
    start = time.time()
    code, out = run_cmd(train_cmd(small_dir, tmp_path / "out", "--dataset=jsonl", f"--jsonl_path={manifest}", "--max_iters=2",
                                  "--ddp_timeout_s=600", nproc=2), timeout=240)
    assert code != 0 and f": {path}: cannot decode image" in out and "data error: m.jsonl line " in out, out[-3000:]
    assert time.time() - start < 200  # torchrun stopped the waiting rank; it did not sit out its 600 s timeout


# ================================================================================================
# the base recipe: assets/build_base.py

def build_base(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(HERE, "assets", "build_base.py"), "--threads=1", *args],
                          capture_output=True, text=True, cwd=HERE, timeout=timeout)


def test_scratch_base_recipe_pretrains_siglip_on_labels_then_learns_understanding_and_generation(tmp_path):
    """assets/build_base.py's phases in miniature: VQ + SigLIP labels first, then understanding (with
    captions) + text-to-image while the labels go on, then without them; the depths chosen reach the export;
    the label head is checkpointed for resume but never exported; a resumed build goes on where it stood."""
    args = [f"--out_dir={tmp_path}", f"--export_dir={tmp_path / 'export'}", "--train_n=64", "--batch_size=8", "--vq_iters=2",
            "--vision_labels_iters=3", "--lm_layers=2", "--eval_interval=0", "--eval_n=8", "--log_interval=1", "--ckpt_interval=4"]
    r = build_base(*args, "--max_iters=4")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x for x in read_log(tmp_path) if "loss" in x]
    assert [sorted(k for k in x if k in ("rec", "vis_color", "vis_shape", "und", "gen")) for x in steps] == \
        [["rec", "vis_color", "vis_shape"]] * 2 + [["gen", "und", "vis_color", "vis_shape"], ["gen", "und"]]
    cfg = json.load(open(tmp_path / "export" / "config.json"))
    assert (cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["num_hidden_layers"]) == (2, 4)  # flag, default
    assert all(0 < x["vis_shape"] < 5 and 0 < x["vis_color"] < 5 for x in steps[:2])
    assert {k for k in load_file(tmp_path / "ckpt" / "state.safetensors") if k.startswith("vision_head.")} == {"vision_head.weight", "vision_head.bias"}
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vision_head.") for k in f.keys())  # (Janus has its own generation_head.vision_head)
    JanusForConditionalGeneration.from_pretrained(tmp_path / "export")
    r = build_base(*args, "--max_iters=6", "--resume=True")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["iter"] for x in read_log(tmp_path) if "loss" in x] == [1, 2, 3, 4, 5, 6]


def test_init_scales_of_a_scratch_model(tmp_path):
    """assets/build_base.py starts the aligner's last layer 10x smaller and SigLIP's position embeddings 10x
    larger than a plain from_config model of the same seed, and nothing else: one step at lr 0 exports them."""
    r = build_base(f"--out_dir={tmp_path}", f"--export_dir={tmp_path / 'export'}", "--export_dtype=float32", "--train_n=64",
                   "--batch_size=8", "--max_iters=1", "--vq_iters=1", "--lr=0", "--eval_n=8")
    assert r.returncode == 0, r.stderr[-3000:]
    scaled = UMM.from_pretrained(str(tmp_path / "export"))
    torch.manual_seed(1337)  # the recipe's seed: the tokenizer draws nothing, so the model's weights come first
    plain = UMM.from_config(tiny_config(scaled.tokenizer, lm_layers=4, vision_layers=4), scaled.tokenizer)
    pos = lambda u: u.janus.model.vision_model.embeddings.position_embedding.weight
    last = lambda u: u.janus.model.aligner.hidden_layers[-1].weight
    assert torch.allclose(pos(scaled), 10 * pos(plain)) and torch.allclose(last(scaled), 0.1 * last(plain))
    assert torch.equal(scaled.janus.model.vision_model.embeddings.patch_embedding.weight,
                       plain.janus.model.vision_model.embeddings.patch_embedding.weight)


# ================================================================================================
# bench.py

def run_bench(*args, timeout=600):
    """bench.py's command line, on CPU, single-threaded (it runs train.py in subprocesses of its own)."""
    return subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--device=cpu", "--threads=1", *args],
                          capture_output=True, text=True, cwd=HERE, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def bench_figures(r):
    """The figures of a bench run that succeeded: its last line, one JSON object."""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_tiny_times_every_step_and_ends_with_its_figures_as_json():
    r = run_bench("--preset=tiny", "--batch_size=2", "--hard_bs=2", "--gen_batch=1", "--repeats=1", "--warmup=1")
    figures = bench_figures(r)
    res = figures["results"]
    assert set(res) == {"sft", "sft_hard", "sft_2x", "unigame_decode", "unigame_generate", "generate_dynamic", "generate_static", "vq"}
    assert [res[k]["batch"] for k in ("sft", "sft_hard", "sft_2x", "generate_static")] == [2, 4, 4, 1]
    assert all(r["ms"] > 0 and r["samples_per_s"] > 0 and r["cpu_ms"] > 0 for r in res.values())
    assert res["generate_static"]["tokens_per_s"] > 0 and res["generate_dynamic"]["tokens_per_s"] > 0
    for k in ("unigame_decode", "unigame_generate"):  # train.py's own stopwatch: its step in three phases
        assert list(res[k]["phases_ms"]) == list(res[k]["phases_cpu_ms"]) == ["perturber", "mine", "understand"]
        assert all(v > 0 for v in res[k]["phases_ms"].values())
        assert sum(res[k]["phases_ms"].values()) == pytest.approx(res[k]["ms"], abs=0.5)  # one timed step: they add up
        assert 0 <= res[k]["hard_per_step"] <= 2
    for k in ("sft", "sft_hard", "sft_2x"):  # the game off: only the understanding step
        assert list(res[k]["phases_ms"]) == ["understand"] and res[k]["phases_ms"]["understand"] == res[k]["ms"]
    for ratios in (figures["ratios"], figures["ratios_cpu_time"]):  # wall time, and the processes' CPU time
        assert all(v > 0 for v in ratios.values()) and "generate_over_decode_per_candidate" in ratios
        assert 0 < ratios["vq_share_of_unigame_decode"] < 1  # the VQ model's work, timed alone, is part of the step
    assert figures["peak_rss_gb"] > 0 and figures["image_tokens"] == 64
    table = r.stdout.strip().splitlines()[:-1]  # the table came before the JSON
    assert any(line.split()[:2] == ["unigame_decode", "2"] for line in table), r.stdout


def test_bench_times_the_game_at_the_aligner_too():
    figures = bench_figures(run_bench("--perturb_at=aligner", "--benchmarks=sft,unigame_decode", "--batch_size=2",
                                      "--hard_bs=2", "--repeats=1", "--warmup=1"))
    assert figures["perturb_at"] == "aligner" and set(figures["results"]) == {"sft", "unigame_decode"}
    assert figures["ratios"]["unigame_decode_over_sft"] > 0  # the hard samples were re-embedded from images + deltas
    assert all(v > 0 for v in figures["results"]["unigame_decode"]["phases_ms"].values())


def test_bench_refuses_a_janus_pro_preset_without_a_gpu():
    r = run_bench("--preset=janus-pro-7b")
    assert r.returncode != 0 and "needs a GPU" in r.stderr, r.stderr


def test_bench_stops_with_the_end_of_train_py_s_output_when_a_run_fails():
    r = run_bench("--benchmarks=sft,unigame_decode", "--lora_r=-1")
    assert r.returncode != 0 and "sft: train.py failed" in r.stderr and "config error: lora_r=-1" in r.stderr, r.stderr
    assert not r.stdout.strip().endswith("}")  # no figures


def test_bf16_autocast_on_cpu_trains_sft_and_the_game_with_the_losses_of_float32():
    """bench.py's loss check without compile: train.py in bf16 autocast against eager float32 from the same seed, SFT and
    the game, every logged loss at every step; the clean understanding loss within 5 % (the check's default; measured
    at most 2.6 % over 8 steps), the game's adversarial losses within 50 % (measured at most 12 %: bf16 flips other codes,
    the game takes another path; BENCHMARKS.md). Not equal, or autocast did not run. A tolerance below what bf16
    changes fails the check, naming run, loss and tolerance."""
    r = run_bench("--check_losses=True", "--batch_size=4", "--hard_bs=2", "--warmup=1", "--repeats=2", "--check_tol=0.002")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(figures["runs"]) == {"bf16 sft", "bf16 unigame_decode"} and figures["steps"] == 3
    sft, game = figures["runs"]["bf16 sft"], figures["runs"]["bf16 unigame_decode"]
    assert set(sft["max_rel_diff"]) == {"loss", "und"} and set(game["max_rel_diff"]) == {"loss", "und", "hard", "adv_start"}
    clean = [sft["max_rel_diff"]["loss"], sft["max_rel_diff"]["und"], game["max_rel_diff"]["und"]]
    adversarial = [game["max_rel_diff"][k] for k in ("loss", "hard", "adv_start")]
    assert all(0 < d < 0.05 for d in clean) and all(0 < d < 0.5 for d in adversarial), figures["runs"]
    assert game["tol"] == {"loss": 0.5, "und": 0.002, "hard": 0.5, "adv_start": 0.5}
    assert figures["failed"] and all(re.fullmatch(r"bf16 (sft: (loss|und)|unigame_decode: und) differs by .* % \(tolerance 0.2 %\)", f)
                                     for f in figures["failed"]), figures["failed"]
    assert "check failed: bf16" in r.stdout


def test_gpu_suite_dry_run_on_cpu_runs_every_part_and_prints_one_table():
    """The GPU suite's plumbing on CPU at a cut-down size (the tiny base in place of the Janus-Pro presets, 2 train.py
    steps, bf16 autocast): every part runs, torchrun with gloo included, and one table reports them all."""
    assert "--allow_cpu=True" in run_bench("--gpu_suite=True").stderr  # a GPU suite refuses the CPU unless asked
    assert "config error: suite_parts='train,nope': choose from train, train_vq" in run_bench("--gpu_suite=True", "--suite_parts=train,nope").stderr
    r = run_bench("--gpu_suite=True", "--allow_cpu=True", "--suite_presets=tiny,tiny", "--suite_steps=2", "--batch_size=2",
                  "--hard_bs=2", "--gen_batch=1", "--warmup=0", "--repeats=1", "--dtype=bfloat16")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    suite = json.loads(r.stdout.strip().splitlines()[-1])
    parts = suite["suite"]
    assert list(parts) == ["train", "train_vq", "train_aligner", "generate", "memory"] and suite["dtype"] == "bfloat16"
    assert not any("error" in p for p in parts.values()), parts
    assert parts["train"]["steps"] == 2 and "torchrun 1 process (gloo)" in parts["train"]["what"]
    assert parts["train_vq"]["perturb_at"] == "vq" and set(parts["train_vq"]["results"]) == {"sft", "unigame_decode", "vq"}
    assert parts["train_aligner"]["perturb_at"] == "aligner" and parts["memory"]["dtype"] == "bfloat16"
    assert set(parts["generate"]["results"]) == {"generate_dynamic", "generate_static"}
    table = r.stdout.strip().splitlines()[:-1]
    for row in ("train:", "train_vq:", "[unigame_decode]", "train_aligner:", "generate:", "memory:"):
        assert any(line.startswith(row) or row in line for line in table), (row, r.stdout)
