"""
What the processes of a DDP job share, by hand on torch.distributed (train.py sets the process group up
from torchrun's environment). With one process, every function here is a no-op.
"""

import torch
import torch.distributed as dist
from tqdm import tqdm


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_grads(params):
    """Average the gradients of these parameters over processes: one all-reduce per bucket of 64 flat gradients."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    for i in range(0, len(grads), 64):
        bucket = grads[i:i + 64]
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, f in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(f.view_as(g))


def any_rank(flag, device="cpu"):
    """True on every rank when `flag` is true on any (a collective: every rank must call it)."""
    if not active():
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def nonfinite(device="cpu", **values):
    """The non-finite ones among these tensors, as 'name=value', e.g. ['loss=nan']. Ranks agree: when any rank
    finds one, every rank gets a non-empty list and skips the update, so that they stay in step (a collective)."""
    found = [f"{k}={v.item():.3g}" for k, v in values.items() if not torch.isfinite(v).all()]
    return found or (["on another rank"] if any_rank(bool(found), device) else [])


def gather(items):
    """Every rank's list of JSON-able items, concatenated in rank order, on every rank (a collective)."""
    if not active():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def check_identical(named, when=""):
    """Debug: every rank must hold exactly rank 0's tensors `named` ({name: tensor}), bit for bit. A rank that
    drifted raises, naming itself and its first differing tensor (its error ends it, and torchrun the job)."""
    if not active():
        return
    sizes = [p.numel() for p in named.values()]
    flat = torch.cat([p.detach().flatten().float() for p in named.values()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    drifted = [n for n, a, b in zip(named, flat.split(sizes), ref.split(sizes)) if not torch.equal(a, b)]
    if drifted:
        raise RuntimeError(f"{when}: rank {dist.get_rank()} holds trained parameters different from rank 0's (first: {drifted[0]})")
    dist.barrier()
    if dist.get_rank() == 0:
        tqdm.write(f"{when}: parameters identical on all {dist.get_world_size()} ranks")
