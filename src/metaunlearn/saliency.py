"""Where the defence may live (meta.salient): the elements of the trained weights that matter to the forget
concept and little to the unrelated ones, ranked by the ratio of their diagonal Fisher information,

    s_i = F_forget,i / (F_unrelated,i + delta),   F_role,i = E[(d L(theta; role batch) / d theta_i)^2],

at the weights the stage starts from (delta: 1e-3 x F_unrelated's mean, so an element no role uses ranks
by F_forget alone). The meta objective's post-attack terms (the ascent after the simulated attack, the
sharpness hinge, the unrelated concepts kept after it) reach the top `fraction` of elements only; the base
method's loss and the keep terms before the attack train every weight (the base method cannot unlearn in a
tenth of them: bench/RESULTS.md).

Why: the meta objective's resistance comes with a sharper forget loss (its gradient runs at several times
the original's: bench/RESULTS.md, issue 10), so a finetuning attacker's steps grow, and they land on
weights the unrelated concepts use too: the collateral. Confining the sharpened weights to the ones the
unrelated concepts barely use is the saliency idea of SalUn (Fan et al., ICLR 2024, which masks by the
forget gradient's size) with the unrelated concepts' own use in the denominator.
"""

from __future__ import annotations

import torch

from .data import RoleData
from .errors import ConfigError
from .model import DiffusionModel

BATCHES = 8  # batches per role: the Fisher estimate's sample
DELTA = 1e-3  # of the unrelated Fisher's mean: the ratio's floor
NEEDS_UNRELATED = ("meta.salient ranks weights against the unrelated concepts' use of them: name some in "
                   "concepts.unrelated, or set meta.salient to null")
THRESHOLD_SAMPLE = 2 ** 24  # elements the top-fraction threshold is estimated from (exact below this)


def fisher(model: DiffusionModel, role: RoleData, params: dict[str, torch.nn.Parameter], batch_size: int,
           seed: int = 0) -> list[torch.Tensor]:
    """Diagonal empirical Fisher of the denoising loss on `role`, per tensor of `params` (float32)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(params.values())
    total = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    for _ in range(BATCHES):
        loss = model.denoising_loss(*role.sample(batch_size, gen), generator=gen)
        for acc, g in zip(total, torch.autograd.grad(loss, tensors, allow_unused=True)):
            if g is not None:
                acc.add_(g.float().square())
    return [t.div_(BATCHES) for t in total]


def salient_masks(model: DiffusionModel, forget: RoleData, unrelated: RoleData | None,
                  params: dict[str, torch.nn.Parameter], fraction: float, batch_size: int,
                  whole: frozenset[str] = frozenset()) -> list[torch.Tensor]:
    """One boolean mask per tensor of `params`: True where the post-attack terms may reach (the top
    `fraction` by score, and every element of the tensors named in `whole`)."""
    if unrelated is None or len(unrelated) == 0:
        raise ConfigError(NEEDS_UNRELATED)
    if fraction >= 1:
        return [torch.ones_like(p, dtype=torch.bool) for p in params.values()]
    f_forget = fisher(model, forget, params, batch_size)
    f_unrelated = fisher(model, unrelated, params, batch_size, seed=1)
    delta = DELTA * float(sum(f.sum() for f in f_unrelated) / sum(f.numel() for f in f_unrelated))
    delta = max(delta, torch.finfo(torch.float32).tiny)  # no unrelated use anywhere: rank by F_forget, no 0 / 0
    scores = [ff.div_(fu.add_(delta)) for ff, fu in zip(f_forget, f_unrelated)]
    del f_unrelated
    threshold = _top_threshold(scores, fraction)
    return [(s >= threshold) | (name in whole) for name, s in zip(params, scores)]


def _top_threshold(scores: list[torch.Tensor], fraction: float) -> float:
    """The score above which `fraction` of all elements lie: exact up to THRESHOLD_SAMPLE elements, else from
    a fixed random sample drawn tensor by tensor (no whole copy of the scores at SD's size)."""
    total = sum(s.numel() for s in scores)
    if total <= THRESHOLD_SAMPLE:
        flat = torch.cat([s.flatten() for s in scores])
    else:
        gen = torch.Generator().manual_seed(0)
        flat = torch.cat([s.flatten()[torch.randint(0, s.numel(), (max(1, s.numel() * THRESHOLD_SAMPLE // total),),
                                                    generator=gen).to(s.device)] for s in scores])
    k = max(1, round(fraction * flat.numel()))
    return float(torch.topk(flat, k, sorted=False).values.min())


def only_salient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`grad` inside the mask, 0 outside (not grad x mask: an fp16 overflow outside the mask, which nothing
    uses, must not become a NaN the loss scaler skips the whole step for)."""
    return torch.where(mask, grad, grad.new_zeros(()))


@torch.no_grad()
def keep_salient(params: list[torch.Tensor], prior: list[torch.Tensor | None], masks: list[torch.Tensor]) -> None:
    """Outside the masks, each .grad goes back to `prior` (what it held before the masked terms' backward
    passes; None: no gradient), so those terms' gradients reach the salient elements only."""
    for p, before, m in zip(params, prior, masks):
        if p.grad is not None:
            p.grad.copy_(torch.where(m, p.grad, before if before is not None else p.grad.new_zeros(())))


class _MaskedGradient(torch.autograd.Function):
    """Identity whose backward pass lets the gradient through where the mask is True only."""

    @staticmethod
    def forward(ctx, tensor, mask):
        ctx.save_for_backward(mask)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return only_salient(grad, mask), None


def masked_gradient(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`tensor`, with gradients reaching it through this use only where `mask` is True (second order:
    the simulated attack's start, so every post-attack path back to theta passes the mask)."""
    return _MaskedGradient.apply(tensor, mask)
