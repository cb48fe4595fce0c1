"""The hard-sample buffer: which adversarial candidates the understanding branch trains on.

Each mining round scores its candidates with `hardness`, keeps the hardest few with
`select_hard`, and pushes them into a `HardBuffer`; each understanding step pops a
batch from it with `HardBuffer.sample`. This file imports only torch so that it can be
copied into other repos.
"""
from collections import Counter

import torch

RULES = ("consistent", "published")


def hardness(ce, s, lambda_c, tau):
    """H = CE + λ_c·max(0, τ − s), elementwise.

    ce is the understanding branch's per-candidate cross-entropy on the adversarial image;
    s in [−1, 1] is the candidate's semantic consistency with its text. Candidates that
    drift below τ count as harder still.
    """
    return ce + lambda_c * (tau - s).clamp_min(0)


def select_hard(H, s, source_idx, q=0.75, topk=2, tau=0.2, rule="consistent"):
    """Indices of the candidates worth keeping, hardest first (a 1-D long tensor).

    H, s, source_idx are 1-D over the batch's candidates; source_idx[i] names the sample
    candidate i was made from. A candidate is kept if
      - H ≥ the q-quantile of H over the whole batch (published q: 0.7–0.8), and
      - rule 'consistent': s ≥ τ as well, so the original answer is still the true label;
        rule 'published': low-s candidates are kept too (they are hard as well);
    then at most `topk` per source sample survive, the highest-H ones.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}, expected one of {RULES}")
    keep = H >= torch.quantile(H.float(), q)
    if rule == "consistent":
        keep &= s >= tau
    kept = keep.nonzero().squeeze(1)
    kept = kept[H[kept].argsort(descending=True, stable=True)]
    taken = Counter()
    chosen = []
    for i, src in zip(kept.tolist(), source_idx[kept].tolist()):
        if taken[src] < topk:
            taken[src] += 1
            chosen.append(i)
    return torch.tensor(chosen, dtype=torch.long, device=H.device)


class HardBuffer:
    """The hardest candidates seen so far, sorted by H descending, at most `capacity`.

    Items are any Python objects (typically dicts of tensors: image tokens, question ids,
    answer); the buffer only reads their H. When full, the lowest-H items are dropped.

    `sample` draws without replacement by rank-softmax and pops what it draws. With N
    items sorted hardest first, the item at rank r = 0..N−1 has inverse rank
    (N−1−r)/(N−1), i.e. 1 for the hardest and 0 for the easiest (1 for a lone item),
    and probability ∝ exp(inverse_rank / temperature). Ranks are normalised to [0, 1]
    so that the tilt does not depend on N: the hardest item is exp(1/T) ≈ 1.8× as
    likely as the easiest at T = 1.75 (T in 1.5–2.0 gives 1.6–1.95×), so the whole
    buffer keeps being replayed with a lean towards hard items. Raw ranks N−1−r would
    make a full 4096-item buffer hand out only its top few items, almost deterministically.

    Under DDP each rank keeps its own buffer of its own candidates; nothing here is
    synchronised. A checkpoint that should resume exactly saves one state per rank.
    """

    def __init__(self, capacity=4096, temperature=1.75):
        self.capacity, self.temperature = capacity, temperature
        self.entries = []  # (H, item), hardest first

    def __len__(self):
        return len(self.entries)

    def push(self, H, items):
        """Add items with hardness H (a 1-D tensor or a list of floats, one per item)."""
        H = H.tolist() if torch.is_tensor(H) else list(H)
        if len(H) != len(items):
            raise ValueError(f"{len(H)} hardness values for {len(items)} items")
        self.entries += zip(map(float, H), items)
        self.entries.sort(key=lambda e: e[0], reverse=True)  # stable: among equal H the older stays first
        del self.entries[self.capacity:]

    def probabilities(self):
        """Probability of each item (hardest first) being the next one drawn, float64."""
        inverse_rank = torch.linspace(1.0, 0.0, len(self.entries), dtype=torch.float64)
        return torch.softmax(inverse_rank / self.temperature, dim=0)

    def sample(self, n, generator=None):
        """Pop and return min(n, len(self)) items drawn without replacement by rank-softmax.
        `generator` is a CPU torch.Generator, for repeatable draws."""
        n = min(n, len(self.entries))
        if n == 0:
            return []
        picked = torch.multinomial(self.probabilities(), n, replacement=False, generator=generator).tolist()
        items = [self.entries[i][1] for i in picked]
        for i in sorted(picked, reverse=True):
            del self.entries[i]
        return items

    def state_dict(self):
        """A plain dict {"capacity", "temperature", "H": float64 tensor, "items": list}.
        Items are kept as they are; the caller decides how to serialise them (torch.save
        handles dicts, lists, strings and tensors, also under torch.load(weights_only=True))."""
        return {
            "capacity": self.capacity,
            "temperature": self.temperature,
            "H": torch.tensor([h for h, _ in self.entries], dtype=torch.float64),
            "items": [item for _, item in self.entries],
        }

    def load_state_dict(self, state):
        self.capacity, self.temperature = state["capacity"], state["temperature"]
        self.entries = list(zip(state["H"].tolist(), state["items"]))
