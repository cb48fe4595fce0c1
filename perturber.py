"""The perturber: UniGame's adversary at the visual-token interface.

A tiny MLP C looks at each visual token z and proposes a direction. The direction is
L2-normalised per token and scaled by a learnable, bounded budget ε, so the adversary
chooses *where* to push a token but never *how far*:

    relative=False   δ = ε · normalize(C(z))          ‖δ‖ = ε            (absolute, as published)
    relative=True    δ = ε · ‖z‖ · normalize(C(z))    ‖δ‖ / ‖z‖ = ε      (scale-free)

Besides its token, C may see (`sees`, a '+'-joined set): the loss's gradient at it ('grad'), a noise vector
per sample ('noise': each draw another attack), the sample's token grid and its question ('context'). The
budget is the same whatever it sees.

Also here: the regulariser R(δ) of the perturber's loss, a random perturbation of the
same budget (the baseline), PGD on δ itself (the fresh attack that measures robustness,
and the strong baseline adversary), one PGD step (which refines the perturber's δ with
the gradient its own update computes), exact code swaps proposed by that gradient, and
direction jitter for mining candidates. This file imports only
torch so that it can be copied into other repos.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_TINY = 1e-12  # floor for norms we divide by: zero tokens and zero gradients must not give NaN
SEES = ("token", "grad", "noise", "context")  # what a Perturber can see; its `sees` is a '+'-joined set of these


def parse_sees(sees):
    """The features a perturber with this `sees` reads, in SEES order ('token' always: every set includes the token
    itself). 'grad+noise', 'noise+grad' and 'token+grad+noise' are one set. A part not in SEES is a ValueError naming it."""
    parts = sees.split("+")
    bad = [p for p in parts if p not in SEES]
    if bad:
        raise ValueError(f"sees={sees!r}: unknown part {bad[0]!r}; expected a '+'-joined set of {', '.join(map(repr, SEES))}, "
                         "e.g. 'grad+noise'")
    return tuple(f for f in SEES if f == "token" or f in parts)


def _unit(x):
    """x / ‖x‖ along the last dim, in float32 (a bf16 norm is off by up to ~0.4 %, enough to break the budget)."""
    return F.normalize(x.float(), dim=-1, eps=_TINY)


def _budget(z, eps, relative):
    """Per-token radius of the budget ball, shape (..., 1), float32."""
    if relative:
        return eps * z.float().norm(dim=-1, keepdim=True)
    return eps * torch.ones(z.shape[:-1] + (1,), device=z.device)


class Perturber(nn.Module):
    """δ_φ(z): a bounded, learnable push on each token of z, shape (..., dim).

    C is Linear-GELU-Linear-GELU-Linear applied to each token. Its last layer is
    orthogonally initialised, so different tokens start with well-spread directions, and
    has no bias, so the direction comes from the token rather than from one shared offset.

    The budget ε = eps_min + (eps_max − eps_min)·sigmoid(θ_ε) is learnable but can never
    leave [eps_min, eps_max]; θ_ε starts at the inverse sigmoid of eps_init, so ε starts
    at eps_init. What ε means depends on `relative`:

    - relative=True: ε is a fraction of each token's own norm, ‖δ‖ = ε·‖z‖ exactly. The
      budget is then scale-free, which is what we want on codebook space, where nothing
      fixes the token scale in advance. Where tokens are L2-normalised codebook vectors
      (‖z‖ = 1) the two modes coincide. An all-zero token gets δ = 0.
    - relative=False: ε is an absolute L2 length, ‖δ‖ = ε exactly, whatever z is. This is
      the published budget (eps_max 0.02, eps_init 0.01 on LM-space embeddings).

    hidden defaults to max(32, dim // 4): the published perturber is under 1 % of the
    backbone, and a 4·dim MLP is not (at dim 256 it would be 1.6 M parameters, a third of
    a 4.4 M model); dim // 4 gives 37 k there (0.84 %) and 9.4 M at Janus-Pro-7B's
    LM width 4096 (0.13 %). The floor of 32 keeps some capacity on narrow codebooks
    (Janus's VQ codebook vectors are 8-dimensional).

    What C sees, `sees`: a '+'-joined set of SEES, the token itself always among it (parse_sees):
    - 'token' alone: each token alone, the published perturber;
    - 'grad': each token beside the loss's gradient at it (forward's grad);
    - 'noise': a noise vector per sample, N(0, I) of noise_dim, shared by its tokens, so that draws of one
      perturber on one sample are different attacks rather than one (mining's candidates);
    - 'context': the sample's token grid and its question: after C's first layer, the question's embedding
      (forward's question, question_dim wide, e.g. the mean of the LM's input embeddings of its tokens) through
      a Linear is added to every token, then one self-attention layer over the sample's tokens, with a learned
      position embedding when `tokens` (the grid's length) is given. At hidden 32 and a 256-wide LM: 16 k parameters.
    The sees string is kept in its canonical form ('token+grad' is 'grad'), and config() names the extra
    sizes only of the features present, so a 'token' or 'grad' perturber reads and writes as before.
    """

    def __init__(self, dim, hidden=None, eps_min=0.0, eps_max=0.02, eps_init=0.01, relative=True, sees="token",
                 noise_dim=8, question_dim=0, tokens=0):
        super().__init__()
        if not eps_min < eps_init < eps_max:  # sigmoid reaches neither end, so eps_init must lie strictly inside
            raise ValueError(f"need eps_min < eps_init < eps_max, got {eps_min}, {eps_init}, {eps_max}")
        self.features = parse_sees(sees)
        if "context" in self.features and question_dim < 1:
            raise ValueError(f"sees={sees!r}: a perturber that sees the context needs question_dim, the question embedding's width")
        if "noise" in self.features and noise_dim < 1:
            raise ValueError(f"sees={sees!r}: a perturber that sees noise needs noise_dim >= 1, got {noise_dim}")
        hidden = hidden or max(32, dim // 4)
        self.sees = "+".join(self.features[1:]) or "token"
        self.noise_dim = noise_dim if "noise" in self.features else 0
        self.net = nn.Sequential(
            nn.Linear(dim * (2 if "grad" in self.features else 1) + self.noise_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, dim, bias=False),
        )
        nn.init.orthogonal_(self.net[-1].weight)
        p = (eps_init - eps_min) / (eps_max - eps_min)
        self.theta_eps = nn.Parameter(torch.tensor(math.log(p / (1 - p))))
        self.eps_min, self.eps_max, self.eps_init, self.relative = eps_min, eps_max, eps_init, relative
        if "context" in self.features:  # the question, added to every token, then one attention layer over the grid
            self.question = nn.Linear(question_dim, hidden)
            self.attn = nn.MultiheadAttention(hidden, num_heads=1, batch_first=True)
            self.pos = nn.Parameter(0.02 * torch.randn(tokens, hidden)) if tokens else None

    @property
    def eps(self):
        """The current budget ε, a 0-dim tensor differentiable w.r.t. θ_ε."""
        return self.eps_min + (self.eps_max - self.eps_min) * torch.sigmoid(self.theta_eps)

    def forward(self, z, grad=None, noise_std=0.0, generator=None, question=None):
        """δ for tokens z of shape (..., dim); same shape and dtype as z. With 'noise' or 'context' in sees, z is
        (..., N, dim): a sample's N tokens.

        Seeing 'grad': C sees each token beside the loss's gradient at it, [z, ‖z‖·g/‖g‖] (input_gradient;
        required), so it can learn where the answer is fragile for this image and this question rather
        than one field for all (Lee et al. 2017, Generative Adversarial Trainer). Otherwise grad is ignored.
        Seeing 'noise': each call draws one n ~ N(0, I) per sample (with `generator`, repeatably) and C sees
        ‖z‖·n beside each token (n itself on unit-norm codebook tokens; scaled with the token elsewhere), so
        each draw is another attack. Seeing 'context': `question` (..., question_dim), one embedding per sample, is required.

        noise_std > 0 adds Gaussian jitter to the unit direction before renormalising, so
        repeated calls on one sample give distinct candidates for mining. Its per-coordinate
        std is noise_std / sqrt(dim), so the jitter's length is about noise_std whatever
        dim is (0.3 tilts the direction by about 17 degrees). The jitter acts on the
        direction only: every draw still has exactly the budget's length. `generator`
        (on z's device) makes draws repeatable.
        """
        x = z.to(self.net[0].weight.dtype)  # a float32 perturber on 16-bit tokens
        seen = [x]
        if "grad" in self.features:
            if grad is None:
                raise ValueError(f"a perturber with sees={self.sees!r} needs grad, the loss's gradient at z (input_gradient)")
            seen.append(_unit(grad) * z.float().norm(dim=-1, keepdim=True))
        if "noise" in self.features:  # one draw per sample, the same for all of its tokens
            n = torch.randn(z.shape[:-2] + (1, self.noise_dim), generator=generator, device=z.device)
            seen.append(n * z.float().norm(dim=-1, keepdim=True))
        if len(seen) > 1:
            x = torch.cat(seen, dim=-1).to(x.dtype)
        h = self.net[1](self.net[0](x))
        if "context" in self.features:
            if question is None:
                raise ValueError(f"a perturber with sees={self.sees!r} needs question, the question's embedding (one per sample)")
            h = h + self.question(question.to(h.dtype)).unsqueeze(-2)
            a = (h if self.pos is None else h + self.pos).reshape(-1, *h.shape[-2:])  # (samples, N, hidden)
            h = h + self.attn(a, a, a, need_weights=False)[0].reshape(h.shape)
        u = _unit(self.net[2:](h))
        if noise_std > 0:
            noise = torch.randn(u.shape, generator=generator, device=u.device)
            u = _unit(u + noise_std / math.sqrt(u.shape[-1]) * noise)
        return (_budget(z, self.eps, self.relative) * u).to(z.dtype)

    def config(self):
        """The constructor arguments, as a plain dict (for a JSON file): Perturber(**p.config()) has the same
        shape and budget range; the learned weights and θ_ε (so the current ε) are in state_dict()."""
        extra = {"noise_dim": self.noise_dim} if self.noise_dim else {}
        if "context" in self.features:
            extra.update(question_dim=self.question.in_features, tokens=0 if self.pos is None else len(self.pos))
        return {"dim": self.net[-1].out_features, "hidden": self.net[0].out_features, "eps_min": self.eps_min,
                "eps_max": self.eps_max, "eps_init": self.eps_init, "relative": self.relative, "sees": self.sees, **extra}

    def extra_repr(self):
        return f"eps in [{self.eps_min}, {self.eps_max}], relative={self.relative}, sees={self.sees!r}"


def input_gradient(loss_fn, z):
    """The gradient of loss_fn(z).sum() with respect to the tokens z, detached: one backward to the inputs
    (no parameter .grad is touched), what a Perturber with sees='grad' aims with. Works under no_grad."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(z).sum(), z)
    return grad


def random_like(z, eps, relative=True, generator=None):
    """A uniformly random direction per token at the same budget as a Perturber: the
    'random perturbation' baseline. ‖δ‖ = eps·‖z‖ (relative) or eps (absolute)."""
    u = _unit(torch.randn(z.shape, generator=generator, device=z.device))
    return (_budget(z, eps, relative) * u).to(z.dtype)


def project(delta, z, eps, relative=True):
    """δ scaled back into the budget ball, per token: ‖δ‖ ≤ eps·‖z‖ (relative) or eps (absolute)."""
    radius = _budget(z, eps, relative)
    return (delta.float() * (radius / delta.float().norm(dim=-1, keepdim=True).clamp_min(_TINY)).clamp(max=1.0)).to(delta.dtype)


def pgd_step(delta, grad, z, eps, step_size, relative=True):
    """One L2 PGD ascent step: each token of δ moves step_size (in units of the budget's scale: ‖z‖ if
    relative, else 1) along its own normalised gradient of the loss, then is projected back into the ball
    of radius eps. Used by pgd_attack, and by a game that refines the perturber's δ with the gradient its
    own update already computed (a learned start refined by PGD)."""
    step = step_size * _budget(z, 1.0, relative)
    return project(delta.float() + step * _unit(grad), z, eps, relative).to(delta.dtype)


def swap_proposals(z, delta, grad, codebook, eps, proposals=3, relative=True, per_token=8):
    """Proposals of exact code swaps for tokens z (B, N, C) perturbed by δ and then snapped to their nearest entry of
    `codebook` (K, C, rows of unit norm, as the projection at 'vq' compares them). The projection is discrete, so the
    gradient of the loss, `grad` at z + δ, only says where to look: the first-order gain of moving a token from the entry
    it now snaps to, e_now, to entry e is (e − e_now)·grad. For each token the `per_token` entries nearest z are tried
    (only near ones are within reach), each by the point of the budget ball nearest to it (z + δ with δ along e − z, as
    far as the ball allows), and kept only if that point snaps to e: a move the budget truly reaches; of those, the one
    of largest gain. Proposal j (j = 1 .. proposals) so moves the 1/2^(j−1) of each sample's tokens with the largest
    gain (the first: every token with a gain) and keeps δ on the rest. Returns one δ per proposal, inside the budget;
    whether a swap hurts is for an exact forward to say (the game keeps, per sample, the hardest proposal)."""
    zf, cb, g = z.float(), codebook.float(), grad.float()

    def snap(t):  # the entry the projection picks (UMM.project_to_codebook): highest cosine
        return (F.normalize(t, dim=-1) @ cb.t()).argmax(-1)
    now = snap(zf + delta.float())
    near = (F.normalize(zf, dim=-1) @ cb.t()).scatter(-1, now[..., None], -math.inf)  # cosine to z, e_now left out
    entry = near.topk(min(per_token, cb.shape[0] - 1), dim=-1).indices  # (B, N, T): the entries nearest z, the reachable ones
    gain = ((cb[entry] - cb[now][..., None, :]) * g[..., None, :]).sum(-1)
    toward = cb[entry] - zf[..., None, :]  # (B, N, T, C)
    reach = _budget(z, eps, relative)[..., None, :]
    step = toward * (reach / toward.norm(dim=-1, keepdim=True).clamp_min(_TINY)).clamp(max=1.0)
    gain = gain.masked_fill(snap(zf[..., None, :] + step) != entry, -math.inf)  # moves the ball does not reach
    best_gain, best = gain.max(-1)
    move_delta = project(step.gather(-2, best[..., None, None].expand(*best.shape, 1, z.shape[-1])).squeeze(-2), z, eps, relative)
    rank = best_gain.argsort(-1, descending=True).argsort(-1)  # each token's place by gain within its sample
    out = []
    for j in range(1, proposals + 1):
        move = (rank < max(1, round(z.shape[-2] / 2 ** (j - 1)))) & (best_gain > 0)  # no move that lowers the first-order loss
        out.append(torch.where(move[..., None], move_delta.to(delta.dtype), delta))
    return out


def jitter(delta, noise_std, generator=None):
    """δ with its per-token direction tilted by Gaussian noise (length about noise_std on the unit
    direction, as Perturber's noise_std) and its per-token length kept: distinct mining candidates
    drawn around one perturbation, whoever found it."""
    u = _unit(delta)
    noise = torch.randn(u.shape, generator=generator, device=u.device)
    u = _unit(u + noise_std / math.sqrt(u.shape[-1]) * noise)
    return (delta.float().norm(dim=-1, keepdim=True) * u).to(delta.dtype)


def total_variation(delta, grid=None):
    """Mean L2 distance between the δ of neighbouring tokens, for delta of shape (..., N, dim).

    Without grid, neighbours are consecutive tokens of the sequence. With grid=(h, w)
    (N = h·w, row-major, as image tokens are laid out) they are horizontal and vertical
    neighbours on the 2-D token grid; the mean is over all such pairs. It is zero for a
    constant field and its gradient there is zero, not NaN.
    """
    d = delta.float()
    if grid is None:
        diffs = [d[..., 1:, :] - d[..., :-1, :]]
    else:
        d = d.unflatten(-2, tuple(grid))
        diffs = [d[..., :, 1:, :] - d[..., :, :-1, :], d[..., 1:, :, :] - d[..., :-1, :, :]]
    return torch.cat([x.norm(dim=-1).flatten() for x in diffs]).mean()


def regularizer(delta, eps, w_l2=1e-3, w_tv=1e-3, w_eps=1e-3, grid=None):
    """R(δ) = w_l2·mean‖δ‖² + w_tv·TV(δ) + w_eps·ε², the penalty in loss_G = −λ·CE_adv + R(δ).

    mean‖δ‖² is over tokens; TV is `total_variation` (over the token grid when grid=(h, w)
    is given, else along the sequence); eps is the perturber's ε (a tensor, so its
    gradient reaches θ_ε). The default weights of 1e-3 are deliberately tiny: against
    λ·CE with λ ≈ 100 they only break ties, favouring smooth, small, cheap perturbations.
    """
    l2 = delta.float().pow(2).sum(-1).mean()
    return w_l2 * l2 + w_tv * total_variation(delta, grid) + w_eps * eps ** 2


def pgd_attack(loss_fn, z, eps, steps, step_size=None, relative=True, generator=None):
    """A fresh L2 PGD attack on δ itself (no perturber), within the Perturber's budget ball.

    Starts at a random point in the ball (random direction, uniform fraction of the
    radius), then takes `steps` ascent steps on loss_fn(z + δ).sum() (loss_fn returns a
    scalar or per-sample losses): each token moves step_size·(‖z‖ if relative) along its
    own normalised gradient, then is projected back to ‖δ‖ ≤ eps·(‖z‖ if relative).
    step_size is in units of eps and defaults to 2.5·eps/steps, so the attack can cross
    the ball more than once. Works under torch.no_grad(); only δ receives gradients, so
    no parameter .grad is touched. Returns δ detached, same shape and dtype as z.
    """
    z = z.detach()
    eps = float(eps)
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    radius = _budget(z, eps, relative)
    u = _unit(torch.randn(z.shape, generator=generator, device=z.device))
    delta = u * radius * torch.rand(radius.shape, generator=generator, device=z.device)
    return pgd_refine(loss_fn, z, delta, eps, steps, step_size, relative).to(z.dtype)


def pgd_refine(loss_fn, z, delta, eps, steps, step_size, relative=True, grad=None):
    """`steps` L2 PGD ascent steps on loss_fn(z + δ).sum() from the start δ given (pgd_step: step_size in
    units of the budget's scale, radius eps). With `grad`, the first step goes along that gradient of the
    loss at δ, already computed elsewhere (a perturber's own update computes it for free), so k steps cost
    k − 1 forward and backward passes. Only δ receives gradients. Returns δ detached."""
    with torch.enable_grad():
        for i in range(steps):
            if grad is None or i:
                d = delta.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(loss_fn(z + d.to(z.dtype)).sum(), d)
            delta = pgd_step(delta.detach(), grad, z, eps, step_size, relative)
    return delta
