"""
Checkpoints: plain dicts to disk and back, atomically, with nothing pickled.

    checkpoint.save(ckpt_dir, meta, shared={"state": ..., "optim": ...}, own={"buffer": ..., "rank": ...},
                    rank=rank, write_extra=lambda tmp: ...)
    meta, shared, own = checkpoint.load(ckpt_dir, rank, world_size)

A state is a dict whose values are tensors, JSON values, or lists and dicts of both (a hard buffer's
state_dict, an RNG state beside a place in the data). State `name` is written as two files:
`name.safetensors` (its tensors, keyed by where they sit, e.g. "items.3.codes") and `name.json` (the
rest, each tensor replaced by {"tensor": key}). `shared` states are the same on every process and
written by rank 0; each process writes its `own` as `name{rank}.*`. Then `ckpt.json` records `meta`,
the step's counters, the number of processes and every file's size, so that a truncated file is
caught on loading.

Atomic: everything goes to `ckpt_dir.tmp`, is flushed to disk (files and folders), and only then
replaces `ckpt_dir` by two renames (ckpt -> ckpt.old, ckpt.tmp -> ckpt). A kill at any moment
leaves a complete checkpoint: `ckpt_dir`, or, between the renames, `ckpt_dir.old`, which `load`
then reads. Reading a missing, truncated or corrupt file stops with one line naming it.

The run's other JSONL files are written and trimmed here too: `trim_log` cuts a log back to a checkpoint's
step on resume, and `log_candidates` appends mining's candidates (train.py --mine_log; pictures.py reads them).
"""

import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


class NotFinite(ValueError):
    """A checkpoint was refused because a tensor it would hold is NaN or infinite."""


# ---- states <-> (tensors, JSON) -----------------------------------------------------------------

def split(state, to_cpu=True):
    """(tensors keyed by path, the JSON-able rest with {"tensor": path} where each tensor was)."""
    tensors = {}

    def walk(x, path):
        if torch.is_tensor(x):
            tensors[path] = x.detach().contiguous().cpu() if to_cpu else x
            return {"tensor": path}
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]
        return x
    return tensors, walk(state, "")


def join(tensors, rest):
    """split's inverse."""
    if isinstance(rest, dict):
        if rest.keys() == {"tensor"} and isinstance(rest["tensor"], str):
            return tensors[rest["tensor"]]
        return {k: join(tensors, v) for k, v in rest.items()}
    if isinstance(rest, list):
        return [join(tensors, v) for v in rest]
    return rest


def write_state(folder, name, state):
    tensors, rest = split(state)
    save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(rest, f)


def read_file(path, size=None):
    """A checkpoint file: JSON, or the tensors of a safetensors file. A missing, truncated (not the
    `size` ckpt.json recorded) or corrupt file stops the run with one line naming it."""
    try:
        if size is not None and os.path.getsize(path) != size:
            raise ValueError(f"{os.path.getsize(path)} bytes where ckpt.json recorded {size}: truncated?")
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return load_file(path)
    except Exception as e:  # OSError, JSONDecodeError, SafetensorError, ...: one line, not a stack trace
        raise SystemExit(f"cannot resume: {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None


def read_state(folder, name, sizes=None):
    """State `name` of a checkpoint folder, as write_state wrote it (sizes: ckpt.json's, to catch truncation)."""
    sizes = sizes or {}
    tensors = read_file(os.path.join(folder, f"{name}.safetensors"), sizes.get(f"{name}.safetensors"))
    rest = read_file(os.path.join(folder, f"{name}.json"), sizes.get(f"{name}.json"))
    try:
        return join(tensors, rest)
    except KeyError as e:
        raise SystemExit(f"cannot resume: {os.path.join(folder, name + '.json')}: refers to tensor {e} that "
                         f"{name}.safetensors does not hold") from None


def load_tensors(named, tensors, where):
    """Copy tensors into the named parameters, in place; all of them must be there, of the right shape."""
    wrong = [n for n, p in named.items() if n not in tensors or tensors[n].shape != p.shape]
    if wrong:
        raise SystemExit(f"cannot resume: {where}: no tensor of the right shape for {wrong[:3]} "
                         "(trained with other lora_r / train_modules / perturb_at?)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n])


def rng_state(device):
    """The RNG states a resumed run needs to go on drawing the same numbers: CPU, and CUDA on a CUDA device."""
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if str(device).startswith("cuda") else {})}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- optimizers, by parameter name ----------------------------------------------------------------

def optimizer_state(opt, names, prefix=""):
    """An optimizer's per-parameter state as {f"{prefix}{name}.{key}": tensor}; names in the order of its params."""
    return {f"{prefix}{names[i]}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def load_optimizer_state(opt, names, tensors, prefix=""):
    sd = opt.state_dict()
    device = next(p.device for g in opt.param_groups for p in g["params"])
    for i, n in enumerate(names):
        st = {k[len(prefix + n) + 1:]: v.to(device) for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix + n}
        if st:
            sd["state"][i] = st
    opt.load_state_dict(sd)


# ---- save and load ----------------------------------------------------------------------------------

def _fsync(path):
    """Flush a file, or a folder's list of entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(ckpt_dir, meta, shared, own, rank=0, write_extra=None):
    """Write a checkpoint; call it on every process. meta: JSON-able (step, config, counters); shared:
    {name: state}, the same on every rank, written by rank 0; own: {name: state} of this rank alone;
    write_extra(folder): rank 0 adds what is not a state (e.g. the merged model in model/).
    Raises NotFinite, before writing anything, when a tensor of `shared` is NaN or infinite: the
    checkpoint in place stays (every rank holds the same shared state, so every rank raises)."""
    bad = [f"{name}: {k}" if name != "state" else k for name, st in shared.items()
           for k, v in split(st, to_cpu=False)[0].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NotFinite(f"not writing a checkpoint with non-finite values (in {bad[:3]}); {ckpt_dir} is left as it was")
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a kill during an earlier save left
        os.makedirs(tmp)
    _barrier()
    for name, st in own.items():
        write_state(tmp, f"{name}{rank}", st)
    _barrier()  # every rank's files are written
    if rank != 0:
        return
    for name, st in shared.items():
        write_state(tmp, name, st)
    if write_extra:
        write_extra(tmp)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sizes = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if os.path.isfile(os.path.join(tmp, f))}
    with open(os.path.join(tmp, "ckpt.json"), "w") as f:
        json.dump({**meta, "world_size": world_size, "shared": sorted(shared), "own": sorted(own), "sizes": sizes}, f, indent=2)
    for folder, _, files in os.walk(tmp):  # on disk before the swap: a rename must never expose unwritten data
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)
    if os.path.isdir(ckpt_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    _fsync(os.path.dirname(os.path.abspath(ckpt_dir)))
    shutil.rmtree(old, ignore_errors=True)


def newest(ckpt_dir):
    """The folder holding the newest complete checkpoint: ckpt_dir, or ckpt_dir.old when a kill came
    between save's two renames."""
    if not os.path.exists(os.path.join(ckpt_dir, "ckpt.json")) and os.path.isdir(ckpt_dir + ".old"):
        return ckpt_dir + ".old"
    return ckpt_dir


def resumed(ckpt_dir, meta, max_iters):
    """The line a resumed run prints: the checkpoint and its step, and where the learning-rate schedule (warm-up,
    then cosine decay to max_iters) ends now, which moves when max_iters is not what the checkpoint's run had."""
    step, was = meta["iter_num"], meta.get("config", {}).get("max_iters", max_iters)
    if step >= max_iters:
        then = f"nothing left to train (max_iters={max_iters})"
    elif was != max_iters:
        then = f"the learning-rate schedule now ends at max_iters={max_iters} (at {was} in the run that wrote the checkpoint)"
    else:
        then = f"the learning-rate schedule ends at max_iters={max_iters}, as before"
    return f"resumed from {newest(ckpt_dir)} at iter {step}: {then}"


def load_meta(ckpt_dir, world_size=None):
    """(folder, ckpt.json) of the newest checkpoint; with world_size, checks that it was written by as many
    processes (each rank's own state resumes exactly only then)."""
    folder = newest(ckpt_dir)
    meta = read_file(os.path.join(folder, "ckpt.json"))
    lacking = {"world_size", "shared", "own", "sizes"} - set(meta)
    if lacking:
        raise SystemExit(f"cannot resume: {folder}/ckpt.json lacks {sorted(lacking)} (written by an older train.py?)")
    if world_size is not None and meta["world_size"] != world_size:
        raise SystemExit(f"cannot resume: {folder} was written by {meta['world_size']} processes, this run has {world_size}: "
                         "each rank's hard buffer, RNG and place in the data resume exactly only with the same number")
    return folder, meta


def load(ckpt_dir, rank=0, world_size=None):
    """(meta, shared states, this rank's own states) of the newest checkpoint in ckpt_dir."""
    folder, meta = load_meta(ckpt_dir, world_size)
    shared = {name: read_state(folder, name, meta["sizes"]) for name in meta["shared"]}
    own = {name: read_state(folder, f"{name}{rank}", meta["sizes"]) for name in meta["own"]}
    return meta, shared, own


def trim_log(path, step):
    """A JSONL log as of a checkpoint at `step`, so that a resumed run's log reads as one run: the lines a
    killed run wrote after its checkpoint go, and so does a line torn by the kill."""
    if not os.path.exists(path):
        return
    lines = []
    for line in open(path):
        try:
            if line.endswith("\n") and json.loads(line).get("iter", 0) <= step:
                lines.append(line)
        except json.JSONDecodeError:
            pass
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def log_candidates(path, step, sources, ce, s, H, keep):
    """Append one JSON line per mining candidate to `path` (train.py --mine_log=True): the step ("iter", as
    log.jsonl numbers it), its source sample, k (which of that sample's candidates: candidate j is candidate
    k = j // len(sources) of sample j % len(sources)), CE, s, H, and whether it entered the buffer."""
    kept, B = set(keep.tolist()), len(sources)
    with open(path, "a") as f:
        for j, (c, si, h) in enumerate(zip(ce.tolist(), s.tolist(), H.tolist())):
            f.write(json.dumps({"iter": step, "source": sources[j % B], "k": j // B, "ce": c, "s": si, "H": h, "kept": j in kept}) + "\n")
