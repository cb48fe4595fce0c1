"""
Data for UniGame: the built-in shapes world, real VQA data (VQAv2 files or a JSONL manifest),
and the loader that feeds train.py / eval.py under DDP.

Every sample, whatever its origin, is one plain dict:

    {"image":    torch.uint8 tensor 3xHxW (real records hold a file path until decoded),
     "question": str, "answers": [str, ...] (ten annotators on VQAv2, one in the world),
     "caption":  str ("" when there is none), "attrs": dict in the world, None for real data,
     "source":   str naming where it came from, e.g. "shapes/train/17" or "questions.json:17"}

Bad input is never dropped silently: loaders raise BadData naming the file and the line or
record, or, with skip_bad=True, skip it, print one warning line per file and append
(source, reason) to the module-level list `skipped`. Images that fail to decode later, inside
DataLoader workers, come back in each batch as batch["skipped"], so the training loop can count
them across worker processes.
"""

import itertools
import json
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# -----------------------------------------------------------------------------
# the shapes world: 32x32 images of one or two coloured shapes, drawn from a seed

SIZE = 32
# corners of the RGB cube: every pair is >= 255 apart, so a blurry VQ reconstruction or a
# generated image still snaps to the right name ("purple" is the magenta corner)
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
          "yellow": (255, 255, 0), "purple": (255, 0, 255), "cyan": (0, 255, 255)}
SHAPES = ("circle", "square", "triangle")
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # share of its bounding box a shape covers
BACKGROUNDS = {"black": (0, 0, 0), "gray": (64, 64, 64), "navy": (0, 0, 80)}  # gray, navy: ood only
HELD_OUT = (("purple", "triangle"), ("cyan", "circle"), ("yellow", "square"))  # ood only, never in train/test
POSITIONS = ("left", "right", "top", "bottom")
CENTRES = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24)}
# each position owns a half of the image (x0, y0, x1, y1); a shape stays 1 px inside its half, so
# shapes are never clipped and a pair always has a gap of at least 2 px between them
REGIONS = {"left": (0, 0, 16, 32), "right": (16, 0, 32, 32), "top": (0, 0, 32, 16), "bottom": (0, 16, 32, 32)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
SPLITS = {"train": 0, "test": 1, "ood": 2}  # each split draws from its own seed stream
OOD_SHIFTS = ("combo", "background", "noise")  # ood sample i carries exactly one: OOD_SHIFTS[i % 3]


def shape_mask(shape, cx, cy, size, hw=(SIZE, SIZE)):
    """Boolean HxW mask of a shape centred at (cx, cy) filling a bounding box of `size` pixels
    (a number, or (width, height)). A pixel belongs to the shape when its centre does; triangles
    point up."""
    w, h = (size, size) if np.isscalar(size) else size
    xs, ys = np.arange(hw[1]) + 0.5, np.arange(hw[0])[:, None] + 0.5
    u, v = (xs - cx) / (w / 2), (ys - cy) / (h / 2)  # the box is [-1, 1]^2
    if shape == "circle":
        return u ** 2 + v ** 2 <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "triangle":
        return (np.abs(v) <= 1) & (np.abs(u) <= (v + 1) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs, rng=None):
    """attrs -> uint8 numpy HxWx3. Objects without geometry (cx, cy, size) are drawn at the
    canonical centre of their position with size 11. Pixel noise (attrs["noise"], a std on the
    0..1 scale) is drawn from rng, default_rng(0) when None so render stays a pure function."""
    image = np.empty((SIZE, SIZE, 3), np.float32)
    image[:] = BACKGROUNDS[attrs["background"]]
    for o in attrs["objects"]:
        cx, cy = CENTRES[o["pos"]]
        image[shape_mask(o["shape"], o.get("cx", cx), o.get("cy", cy), o.get("size", 11))] = COLORS[o["color"]]
    if attrs.get("noise", 0) > 0:
        rng = np.random.default_rng(0) if rng is None else rng
        image += rng.normal(0, 255 * attrs["noise"], image.shape).astype(np.float32)
    return image.clip(0, 255).round().astype(np.uint8)


DESCRIBE = "describe the image."  # the understanding question whose answer is the caption (assets/build_base.py's caption_p)


def caption(attrs):
    """'a red circle on the left and a blue square on the right'"""
    return " and ".join(f"a {o['color']} {o['shape']} {PHRASES[o['pos']]}" for o in attrs["objects"])


def object_labels(attrs):
    """Per object: (x0, y0, x1, y1), the pixel box it lives in (its half of the image when there are two,
    the whole image when alone), and the indices of its colour in COLORS and its shape in SHAPES. The
    labels of assets/build_base.py's vision_labels_iters, which pretrain the tiny SigLIP."""
    objs = attrs["objects"]
    return [(REGIONS[o["pos"]] if len(objs) > 1 else (0, 0, SIZE, SIZE), list(COLORS).index(o["color"]), SHAPES.index(o["shape"]))
            for o in objs]


def caption_qa(attrs):
    """The (question, answer) pairs that the caption of attrs settles. Shown the image it
    generated from that caption, the model should answer all of them (consistency)."""
    objs = attrs["objects"]
    present = {(o["color"], o["shape"]) for o in objs}
    colors = list(COLORS)
    qa = [("how many shapes are there?", str(len(objs)))]
    for o in objs:
        qa.append((f"what color is the {o['shape']}?", o["color"]))
        qa.append((f"where is the {o['shape']}?", o["pos"]))
        if sum(p["color"] == o["color"] for p in objs) == 1:
            qa.append((f"what shape is the {o['color']} object?", o["shape"]))
        qa.append((f"is there a {o['color']} {o['shape']}?", "yes"))
        # the next colour round the palette that makes an absent, seen combination
        i = colors.index(o["color"])
        for c in colors[i + 1:] + colors[:i]:
            if (c, o["shape"]) not in present and (c, o["shape"]) not in HELD_OUT:
                qa.append((f"is there a {c} {o['shape']}?", "no"))
                break
    return qa


def _sample_attrs(split, i, rng):
    """Draw the attrs of world sample i, and k, the object its question is about."""
    shift = OOD_SHIFTS[i % len(OOD_SHIFTS)] if split == "ood" else "none"
    if rng.random() < 0.5:
        layout = [POSITIONS[rng.integers(len(POSITIONS))]]
    else:
        layout = ["left", "right"] if rng.random() < 0.5 else ["top", "bottom"]
    n = len(layout)
    k = int(rng.integers(n))
    shapes = [SHAPES[j] for j in rng.permutation(len(SHAPES))[:n]]  # a pair never shares a shape
    held = HELD_OUT[rng.integers(len(HELD_OUT))] if shift == "combo" else None
    if held and held[1] in shapes:  # object k takes the held-out shape; shapes stay distinct
        j = shapes.index(held[1])
        shapes[j], shapes[k] = shapes[k], shapes[j]
    elif held:
        shapes[k] = held[1]
    objects = []
    for j, (pos, shape) in enumerate(zip(layout, shapes)):
        seen = [c for c in COLORS if (c, shape) not in HELD_OUT]
        color = held[0] if held and j == k else seen[rng.integers(len(seen))]
        size = rng.uniform(9, 13)
        cx, cy = CENTRES[pos]
        x0, y0, x1, y1 = REGIONS[pos]
        cx += rng.uniform(max(-2, x0 + 1 + size / 2 - cx), min(2, x1 - 1 - size / 2 - cx))
        cy += rng.uniform(max(-2, y0 + 1 + size / 2 - cy), min(2, y1 - 1 - size / 2 - cy))
        objects.append({"color": color, "shape": shape, "pos": pos,
                        "cx": round(cx, 2), "cy": round(cy, 2), "size": round(size, 2)})
    background = ("gray", "navy")[rng.integers(2)] if shift == "background" else "black"
    noise = round(rng.uniform(0.03, 0.08), 3) if shift == "noise" else 0.0
    return {"objects": objects, "background": background, "noise": noise, "shift": shift}, k


def _question(attrs, k, rng):
    """One templated question about object k (or the count), unambiguous for the image."""
    objs, o = attrs["objects"], attrs["objects"][k]
    kinds = ["color", "shape", "count", "exists", "where"]
    if sum(p["color"] == o["color"] for p in objs) > 1:
        kinds.remove("shape")  # "the red object" would not name one object
    kind = kinds[rng.integers(len(kinds))]
    if kind == "color":
        return f"what color is the {o['shape']}?", o["color"]
    if kind == "shape":
        return f"what shape is the {o['color']} object?", o["shape"]
    if kind == "count":
        return "how many shapes are there?", str(len(objs))
    if kind == "where":
        return f"where is the {o['shape']}?", o["pos"]
    if rng.random() < 0.5:
        return f"is there a {o['color']} {o['shape']}?", "yes"
    # a plausible "no": the object with one attribute changed, absent from the image, and never
    # a held-out combination, which must not appear in train/test even in question text
    present = {(p["color"], p["shape"]) for p in objs}
    absent = [(c, o["shape"]) for c in COLORS] + [(o["color"], s) for s in SHAPES]
    absent = [a for a in absent if a not in present and a not in HELD_OUT]
    c, s = absent[rng.integers(len(absent))]
    return f"is there a {c} {s}?", "no"


def shapes_world(split, n, seed=0):
    """n samples of the shapes world. Sample i depends only on (seed, split, i): the same call
    gives the same samples, a shorter call gives a prefix, and the splits never share a stream.
    'ood' cycles through one shift per sample: held-out colour x shape combination (on the object
    the question is about), gray/navy background, additive pixel noise (attrs["shift"])."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {list(SPLITS)}")
    samples = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        attrs, k = _sample_attrs(split, i, rng)
        question, answer = _question(attrs, k, rng)
        image = torch.from_numpy(render(attrs, rng)).permute(2, 0, 1).contiguous()
        samples.append({"image": image, "question": question, "answers": [answer],
                        "caption": caption(attrs), "attrs": attrs, "source": f"shapes/{split}/{i}"})
    return samples


# -----------------------------------------------------------------------------
# the oracle: read the objects back from pixels, so generated images can be scored exactly


def _components(label, min_pixels):
    """4-connected components of equal nonzero label, as (label, boolean mask); tiny ones
    (noise, stray colours at edges) are dropped. Plain lists: a 32x32 flood fill is faster in
    Python than any numpy formulation."""
    h, w = label.shape
    flat, seen, found = label.ravel().tolist(), [False] * (h * w), []
    for start in np.flatnonzero(label).tolist():
        if seen[start]:
            continue
        c, stack, pixels = flat[start], [start], []
        seen[start] = True
        while stack:
            p = stack.pop()
            pixels.append(p)
            y, x = divmod(p, w)
            for q in (p - w if y > 0 else -1, p + w if y < h - 1 else -1, p - 1 if x > 0 else -1, p + 1 if x < w - 1 else -1):
                if q >= 0 and not seen[q] and flat[q] == c:
                    seen[q] = True
                    stack.append(q)
        if len(pixels) >= min_pixels:
            mask = np.zeros(h * w, bool)
            mask[pixels] = True
            found.append((c, mask.reshape(h, w)))
    return found


def read_attrs(image):
    """Read {"objects": [{"color", "shape", "pos"}, ...], "background": name} from a uint8
    image, 3xHxW tensor (the contract) or HxWxC numpy array (what render returns).
    Pixels snap to the nearest palette colour or to the background (the median colour); pixels
    far from all of them are ignored. Each connected region of one colour covering at least
    1/80 of the image is one object. Its shape is the one that, drawn by shape_mask with the
    region's centre, aspect ratio and pixel count, overlaps it best (IoU), or 'unknown' below
    0.5: a square's corners, a circle's roundness and a triangle's slope each decide, whatever
    the size. Its position is the side of the image centre its bounding box lies on, along the
    axis where it is farther off centre."""
    if torch.is_tensor(image):
        image = image.permute(1, 2, 0).numpy()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"read_attrs wants a uint8 RGB image, got {image.dtype} of shape {image.shape}")
    h, w, _ = image.shape
    pixels = image.reshape(-1, 3).astype(np.float32)
    bg = np.median(pixels, axis=0)  # shapes never cover half the image
    refs = np.array([bg] + list(COLORS.values()), np.float32)
    dist = np.linalg.norm(pixels[:, None, :] - refs[None], axis=2)
    label = dist.argmin(1)
    label[dist.min(1) > 120] = 0  # a colour that is no palette colour belongs to no shape
    objects, names = [], list(COLORS)
    for c, mask in _components(label.reshape(h, w), min_pixels=max(4, h * w // 80)):
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        ious = []
        for s in SHAPES:  # each candidate drawn with the region's centre, aspect ratio and area
            k = np.sqrt(mask.sum() / (FILL[s] * bw * bh))
            m = shape_mask(s, cx, cy, (k * bw, k * bh), (h, w))
            ious.append((mask & m).sum() / (mask | m).sum())
        shape = SHAPES[int(np.argmax(ious))] if max(ious) >= 0.5 else "unknown"
        dx, dy = cx - w / 2, cy - h / 2
        pos = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("top" if dy < 0 else "bottom")
        objects.append((cx + cy, {"color": names[c - 1], "shape": shape, "pos": pos}))
    objects = [o for _, o in sorted(objects, key=lambda t: t[0])]  # left before right, top before bottom
    background = min(BACKGROUNDS, key=lambda b: np.linalg.norm(bg - np.array(BACKGROUNDS[b])))
    return {"objects": objects, "background": background}


def oracle_score(image, attrs):
    """GenEval-style: 1.0 when the image holds exactly the objects of attrs, each with the right
    colour, shape and position, else 0.0."""
    key = lambda o: (o["color"], o["shape"], o["pos"])
    return float(sorted(map(key, read_attrs(image)["objects"])) == sorted(map(key, attrs["objects"])))


# -----------------------------------------------------------------------------
# real data: VQAv2 files, JSONL manifests, image decoding


class BadData(ValueError):
    """A record or image that cannot be used; the message names the file and line/record."""


SKIP_HINT = "(skip_bad=True skips and counts such samples)"  # closes the error of one bad sample


skipped = []  # (source, reason) for every record a loader or readable() skipped in this process (skip_bad=True)


def _keep_good(path, unit, entries, parse, skip_bad):
    """Run parse(number, entry) -> record over the (number, entry) pairs of a file, where a
    number counts `unit`s ("line", "record"). A BadData becomes an error naming the file and
    the unit, or with skip_bad a skip: appended to `skipped`, and all of a file's skips
    reported in one warning line."""
    records, bad = [], []
    for number, entry in entries:
        try:
            records.append(parse(number, entry))
        except BadData as e:
            if not skip_bad:
                raise BadData(f"{path} {unit} {number}: {e} {SKIP_HINT}") from None
            bad.append((number, str(e)))
    if bad:
        skipped.extend((f"{os.path.basename(path)}:{number}", reason) for number, reason in bad)
        first = "; ".join(f"{unit} {number}: {reason}" for number, reason in bad[:3])
        more = "; ..." if len(bad) > 3 else ""
        print(f"warning: {path}: skipped {len(bad)} bad of {len(bad) + len(records)} records ({first}{more})")
    return records


def _check(question, answers):
    if not isinstance(question, str) or not question.strip():
        raise BadData("empty question")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise BadData(f"answers must be a non-empty list of strings, got {answers!r}")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BadData(f"{path}: not valid JSON ({e})") from None


def load_vqav2(questions_json, annotations_json, image_dir, skip_bad=False):
    """Official VQAv2 question + annotation files and a folder of COCO images named
    COCO_{subtype}_{image_id:012d}.jpg. The subtype (e.g. val2014) comes from the questions
    file's data_subtype, else from the file names in image_dir. All ten answers are kept;
    "source" is "{questions file}:{index in its question list}"."""
    questions, annotations = _read_json(questions_json), _read_json(annotations_json)
    try:
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
    except (KeyError, TypeError) as e:
        raise BadData(f"{annotations_json}: malformed annotations ({e!r})") from None
    subtype = questions.get("data_subtype")
    found = {}  # subtype -> {image_id: path}; one listing instead of a stat per question
    for name in os.listdir(image_dir):
        m = re.fullmatch(r"COCO_([a-z]+\d*)_(\d{12})\.jpg", name)
        if m and (subtype is None or m[1] == subtype):
            found.setdefault(m[1], {})[int(m[2])] = os.path.join(image_dir, name)
    if len(found) > 1:
        raise BadData(f"{image_dir}: images of several subtypes {sorted(found)}; {questions_json} names none")
    images = next(iter(found.values()), {})
    name = os.path.basename(questions_json)

    def parse(i, q):
        if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= q.keys():
            raise BadData(f"malformed question {q!r}")
        if q["question_id"] not in answers:
            raise BadData(f"question {q['question_id']} has no annotation in {annotations_json}")
        _check(q["question"], answers[q["question_id"]])
        if q["image_id"] not in images:
            expected = f"COCO_{subtype}_{q['image_id']:012d}.jpg" if subtype else f"image {q['image_id']}"
            raise BadData(f"image file not found: {os.path.join(image_dir, expected)}")
        return {"image": images[q["image_id"]], "question": q["question"], "answers": answers[q["question_id"]],
                "caption": "", "attrs": None, "source": f"{name}:{i}"}

    if not isinstance(questions, dict) or "questions" not in questions:
        raise BadData(f"{questions_json}: no 'questions' list")
    return _keep_good(questions_json, "record", enumerate(questions["questions"]), parse, skip_bad)


def training_records(dataset, train_n=20000, vqav2_questions="", vqav2_annotations="", vqav2_images="", jsonl_path="",
                     skip_bad=False):
    """train.py's training samples: train_n of the built-in world's train split (dataset='shapes'), the
    official VQAv2 files ('vqav2'), or a JSONL manifest ('jsonl')."""
    if dataset == "shapes":
        return shapes_world("train", train_n, seed=0)
    if dataset == "vqav2":
        return load_vqav2(vqav2_questions, vqav2_annotations, vqav2_images, skip_bad=skip_bad)
    if dataset == "jsonl":
        return load_jsonl(jsonl_path, skip_bad=skip_bad)
    raise ValueError(f"dataset={dataset!r}: expected 'shapes', 'vqav2' or 'jsonl'")


def missing_files(dataset, jsonl_path="", vqav2=("", "", ""), eval_vqav2=("", "", "")):
    """What the chosen data lacks on disk, one line each naming the keys (train.py checks before reading anything):
    vqav2 and eval_vqav2 are (questions JSON, annotations JSON, image folder)."""
    def absent(files):
        return not (os.path.isfile(files[0]) and os.path.isfile(files[1]) and os.path.isdir(files[2]))
    problems = []
    if dataset == "jsonl" and not os.path.isfile(jsonl_path):
        problems.append(f"dataset='jsonl': jsonl_path={jsonl_path!r} is not a file")
    if dataset == "vqav2" and absent(vqav2):
        problems.append(f"dataset='vqav2': need the files vqav2_questions={vqav2[0]!r}, vqav2_annotations={vqav2[1]!r} "
                        f"and the folder vqav2_images={vqav2[2]!r}")
    if any(eval_vqav2) and (dataset == "shapes" or absent(eval_vqav2)):
        problems.append(f"evaluation on VQAv2 val needs real data, the files eval_vqav2_questions={eval_vqav2[0]!r}, "
                        f"eval_vqav2_annotations={eval_vqav2[1]!r} and the folder eval_vqav2_images={eval_vqav2[2]!r} "
                        "(or all three '': evaluate on a held-out slice of the training data)")
    return problems


JSONL_KEYS = {"image", "question", "answers", "caption"}


def load_jsonl(path, skip_bad=False):
    """A manifest with one JSON object per line: {"image": path (relative to the manifest's
    folder), "question": str, "answers": [str, ...], "caption": optional str}. Blank lines are
    allowed; unknown keys are an error. "source" is "{manifest}:{line number}"."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)

    def parse(n, line):
        try:
            r = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:  # e's own "line" would count lines within this one
            raise BadData(f"malformed JSON: {e.msg}: column {e.colno}") from None
        if not isinstance(r, dict):
            raise BadData(f"expected a JSON object, got {type(r).__name__}")
        if r.keys() - JSONL_KEYS:
            raise BadData(f"unknown keys {sorted(r.keys() - JSONL_KEYS)}, expected {sorted(JSONL_KEYS)}")
        if not {"image", "question", "answers"} <= r.keys():
            raise BadData(f"missing keys {sorted({'image', 'question', 'answers'} - r.keys())}")
        _check(r["question"], r["answers"])
        if not isinstance(r.get("caption", ""), str):
            raise BadData("caption must be a string")
        image = os.path.join(folder, r["image"])
        if not os.path.isfile(image):
            raise BadData(f"image file not found: {image}")
        return {"image": image, "question": r["question"], "answers": r["answers"],
                "caption": r.get("caption", ""), "attrs": None, "source": f"{name}:{n}"}

    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    return _keep_good(path, "line", lines, parse, skip_bad)


def load_image(path):
    """Decode an image file to a uint8 3xHxW RGB tensor, whatever its mode: grayscale and palette
    are expanded, transparency (RGBA, LA, PA, P with a transparent index) is composited over
    white, CMYK is converted, 16-bit grayscale (I;16*, and I, which older Pillow gives 16-bit
    PNGs; a 32-bit I file is read as 16-bit) is scaled by 255/65535 rather than clipped. EXIF rotation is applied.
    A missing, corrupt or truncated file raises BadData naming the file."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncation only shows here
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):
                a = np.asarray(im).astype(np.float64)
                a = (a.clip(0, 65535) / 257).round().astype(np.uint8)
                return torch.from_numpy(a).expand(3, *a.shape).contiguous()
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            a = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise BadData(f"{path}: image file not found") from None
    except Exception as e:  # Pillow reports corruption as OSError, SyntaxError, ValueError, ...
        raise BadData(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def where(source):
    """A sample's source in words: "m.jsonl:14" -> "m.jsonl line 14"; a VQAv2 questions file's "questions.json:17"
    -> "questions.json record 17" (the index in its question list); the world's "shapes/test/3" as it is."""
    name, _, number = source.rpartition(":")
    if not number.isdigit():
        return source
    return f"{name} {'record' if name.endswith('.json') else 'line'} {number}"


def readable(records, n, skip_bad=False):
    """The first n records whose image decodes (each tried once, by decoding it). One that does not raises
    BadData naming its manifest line or record and its file, or with skip_bad is skipped: appended to
    `skipped`, and all of them reported in one warning line. Evaluation sets go through here once, so
    that every evaluation reads only images known to decode."""
    good, bad = [], []
    for r in records:
        if len(good) == n:
            break
        if isinstance(r["image"], str):
            try:
                load_image(r["image"])
            except BadData as e:
                if not skip_bad:
                    raise BadData(f"{where(r['source'])}: {e} {SKIP_HINT}") from None
                bad.append((r["source"], str(e)))
                continue
        good.append(r)
    if bad:
        skipped.extend(bad)
        print(f"warning: left {len(bad)} unreadable image{'s' * (len(bad) > 1)} out of evaluation "
              f"({where(bad[0][0])}: {bad[0][1]}{'; ...' if len(bad) > 1 else ''})")
    return good


def held_out(records, n, seed=0):
    """Split real records into (training, held out) with no image in both: whole images, in an order drawn
    from `seed` alone (the same in every run, whatever its training seed), are held out until they hold at
    least n records. An image asked about twice is never trained on under one question and evaluated on
    under another."""
    images = list(dict.fromkeys(r["image"] for r in records))
    per_image = {}
    for r in records:
        per_image[r["image"]] = per_image.get(r["image"], 0) + 1
    chosen, count = set(), 0
    for i in np.random.default_rng(seed).permutation(len(images)).tolist():
        if count >= n:
            break
        chosen.add(images[i])
        count += per_image[images[i]]
    return [r for r in records if r["image"] not in chosen], [r for r in records if r["image"] in chosen]


def evaluation_records(dataset, records, n, skip_bad=False, vqav2_questions="", vqav2_annotations="", vqav2_images=""):
    """train.py's evaluation samples, never trained on: (what to train on, what to evaluate on, which they are in
    words). The world's test split; on real data VQAv2's val2014 files when given (their first n readable
    questions), else a held-out slice of the training records (held_out: whole images, taken out of training).
    Only images that decode are evaluated on (readable)."""
    if dataset == "shapes":
        return records, shapes_world("test", n, seed=0), f"{n} samples of the built-in world's test split"
    if vqav2_questions:
        training, candidates = records, load_vqav2(vqav2_questions, vqav2_annotations, vqav2_images, skip_bad)
        what = f"the first {{}} readable questions of {vqav2_questions}"
    else:
        training, candidates = held_out(records, n)
        images = len({r["image"] for r in candidates})
        what = (f"{{}} held-out samples: every question on {images} image{'s' * (images > 1)} is left out of training, "
                f"which keeps {len(training)} of {len(records)} samples")
    evaluated = readable(candidates, n, skip_bad)
    if not evaluated:
        raise BadData(f"no evaluation sample has a readable image ({what.format(0)})")
    return training, evaluated, what.format(len(evaluated))


def describe_skips(entries, when):
    """One line, in words, on the samples skipped `when` ("in training"), from their (source, reason) pairs, one
    pair each time a sample was met: how many distinct samples, how often they were met, the first few by
    manifest line or record, and the first one's reason. "" when there are none."""
    if not entries:
        return ""
    met = {}
    for source, reason in entries:
        met.setdefault(source, [0, reason])[0] += 1
    names = [where(s) for s in met]
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    times = f", met {len(entries)} times in all" if len(entries) > len(met) else ""
    first = next(iter(met.values()))[1]
    return f"skipped {len(met)} bad sample{'s' * (len(met) > 1)} {when}{times}: {listed} (first: {first})"


# -----------------------------------------------------------------------------
# dataset, batching, loader


class Records(Dataset):
    """A list of sample dicts as a Dataset; image paths are decoded on access. With
    skip_bad=True an image that fails to decode yields a marker {"source", "bad": reason}
    instead of an error, which collate drops and reports in batch["skipped"]."""

    def __init__(self, records, skip_bad=False):
        self.records, self.skip_bad = records, skip_bad

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        if not isinstance(r["image"], str):
            return r
        try:
            return dict(r, image=load_image(r["image"]))
        except BadData as e:
            if not self.skip_bad:
                raise BadData(f"{where(r['source'])}: {e}") from None
            return {"source": r["source"], "bad": str(e)}


def collate(samples):
    """Samples -> batch of lists. "images" is always a list of uint8 3xHxW tensors (real images
    differ in size; the model resizes; stack them yourself in the world). "skipped" lists
    (source, reason) of samples dropped from this batch, so a batch may hold fewer samples than
    asked for, or none."""
    good = [s for s in samples if "bad" not in s]
    return {"images": [s["image"] for s in good], "questions": [s["question"] for s in good],
            "answers": [s["answers"] for s in good], "captions": [s["caption"] for s in good],
            "attrs": [s["attrs"] for s in good], "sources": [s["source"] for s in good],
            "skipped": [(s["source"], s["bad"]) for s in samples if "bad" in s]}


class EpochSampler(DistributedSampler):
    """This process's share of the indices of one epoch, shuffled from (seed, epoch) alone, and
    started `start` indices in. Because an epoch's order is a pure function of its number, a resumed
    run can land at any point of any epoch by skipping indices: the samples it skips are never loaded.
    Without a process group it is the only replica (rank 0 of 1)."""

    def __init__(self, dataset, shuffle=True, seed=0, drop_last=True):
        single = not (dist.is_available() and dist.is_initialized())
        super().__init__(dataset, num_replicas=1 if single else None, rank=0 if single else None,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return max(0, super().__len__() - self.start)


def make_loader(dataset, batch_size, shuffle=True, seed=0, num_workers=0, drop_last=True):
    """A DataLoader of collated batches. Under torch.distributed each rank reads its own shard (rank
    and world size from the process group). The order changes only when the epoch does: iterate with
    infinite_batches, which sets it. The loader has its own generator, so starting an epoch never
    draws from torch's global RNG (which drives dropout and the perturber's jitter)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle, seed, drop_last),
                      num_workers=num_workers, collate_fn=collate, drop_last=drop_last,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def infinite_batches(loader, epoch=0, start=0):
    """Yield batches forever, epoch after epoch, beginning with batch `start` of epoch `epoch`. Each
    batch carries batch["position"] = (epoch, batch) of the next batch to be read: a run that saves it
    and passes it back here resumes the data exactly where it stood. Skipped batches cost nothing:
    the sampler leaves out their indices, so they are neither loaded nor decoded."""
    sampler = loader.sampler
    sampler.start = 0
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"loader yields no batches ({len(loader.dataset)} samples, batch size {loader.batch_size})")
    while True:
        sampler.set_epoch(epoch)
        sampler.start = start * loader.batch_size
        for i, batch in enumerate(loader, start):
            batch["position"] = (epoch, i + 1) if i + 1 < per_epoch else (epoch + 1, 0)
            yield batch
        epoch, start = epoch + 1, 0


def make_dataset(name, split="train", n=10000, seed=0, skip_bad=False, **paths):
    """'shapes' (split, n, seed) | 'vqav2' (questions_json, annotations_json, image_dir) |
    'jsonl' (path) -> Records."""
    if name == "shapes":
        if paths:
            raise ValueError(f"shapes takes no paths, got {sorted(paths)}")
        return Records(shapes_world(split, n, seed))
    if name == "vqav2":
        return Records(load_vqav2(skip_bad=skip_bad, **paths), skip_bad)
    if name == "jsonl":
        return Records(load_jsonl(skip_bad=skip_bad, **paths), skip_bad)
    raise ValueError(f"unknown dataset {name!r}, expected 'shapes', 'vqav2' or 'jsonl'")
