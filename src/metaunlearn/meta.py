"""The meta-unlearning objective (PAPER.md, "The meta objective"), for any
loss-based base method.

Simulated attack (M inner steps on the forget data, step size tau):

    theta' = theta - tau * step(grad L(theta; forget))

Meta loss, added to the base method's loss by the training loop:

    L_meta = - a * A(L(theta'; forget))      forget stays unlearned after the attack
             - b * A(L(theta'; related))     related concepts self-destruct after the attack
             + c * L(theta;  related)        related concepts stay good before it
             + d * L(theta;  unrelated)      unrelated concepts stay good before it
             - e * A(L(theta'; unrelated))   the reference code's extra term (default off)

A bounds the ascent ("capped": no gradient once a post-attack loss exceeds
`cap` times the original model's loss on that role, measured at setup, so the
bound means the same at every model scale), or the forget term is replaced by pulling the
post-attack prediction to the base method's unlearning target
("unlearn_target"), which is bounded below by zero instead of unbounded.

Modes: `second_order` differentiates through the inner steps
(`torch.func.functional_call` over an ordered name -> tensor mapping,
`create_graph=True`); `first_order` evaluates the post-attack gradients on a
detached copy and adds them to theta's gradient through a zero-valued linear
surrogate, sum((theta - sg(theta)) * sg(g')), whose gradient is exactly g'.

Step forms: `sgd` (the paper); `normalized` (a step of length tau whatever the
gradient's size, so the model cannot fool the simulation by inflating its
forget gradient, which a fixed-size SGD step rewards); `adam` (the first step
of Adam, g / (|g| + eps): what a real attacker's optimizer does first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import MetaConfig
from .data import ConceptData
from .engine import StepContext, Terms
from .errors import MetaunlearnError
from .methods.base import Method
from .model import DiffusionModel

ADAM_EPS = 1e-8
REFERENCE_BATCHES = 4  # batches that measure the original model's loss per role (capped target)


def inner_direction(grads: list[torch.Tensor], form: str) -> list[torch.Tensor]:
    """The update direction of one simulated attacker step."""
    if form == "sgd":
        return grads
    if form == "normalized":
        norm = torch.sqrt(sum((g * g).sum() for g in grads) + 1e-20)
        return [g / norm for g in grads]
    if form == "adam":
        return [g / (g.abs() + ADAM_EPS) for g in grads]
    raise ValueError(f"unknown inner step form '{form}'")


def linear_surrogate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Zero-valued term whose gradient w.r.t. params is `grads` (first-order meta)."""
    return sum(((p - p.detach()) * g.detach()).sum() for p, g in zip(params, grads))


class MetaObjective:
    """A training-engine objective: called every step with the step context."""

    def __init__(self, config: MetaConfig, model: DiffusionModel, trainable: dict[str, torch.nn.Parameter],
                 data: ConceptData, method: Method, batch_size: int):
        self.config, self.model, self.data, self.method = config, model, data, method
        self.names = list(trainable)  # module order: the mapping functional_call receives
        self.trainable = trainable
        self.batch_size = batch_size
        self.cap_levels = self._cap_levels() if config.target == "capped" else {}
        if config.target == "unlearn_target" and not method.has_target:
            raise MetaunlearnError(f"meta.target 'unlearn_target' needs a base method with a target, "
                                   f"not '{method.name}'")

    def inner_lr(self, ctx: StepContext) -> float:
        """tau: fixed, or log-uniform in the configured range (an attacker whose lr is unknown)."""
        if self.config.inner_lr_range is None:
            return self.config.inner_lr
        low, high = self.config.inner_lr_range
        u = float(torch.rand((), generator=ctx.generator))
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))

    def _batch(self, role, ctx):
        return None if role is None or len(role) == 0 else role.sample(self.batch_size, ctx.generator)

    def _loss(self, batch, params, ctx) -> torch.Tensor:
        latents, cond = batch
        return self.model.denoising_loss(latents, cond, params=params, generator=ctx.generator)

    @torch.no_grad()
    def _cap_levels(self) -> dict[str, float]:
        """cap x the original model's denoising loss on each role (fixed batches)."""
        levels = {}
        for name in ("forget", "related", "unrelated"):
            role = getattr(self.data, name)
            if role is None or len(role) == 0:
                continue
            gen = torch.Generator().manual_seed(0)
            losses = [self.model.denoising_loss(*role.sample(self.batch_size, gen), generator=gen).item()
                      for _ in range(REFERENCE_BATCHES)]
            levels[name] = self.config.cap * sum(losses) / len(losses)
        return levels

    def _ascent(self, loss: torch.Tensor, role: str) -> torch.Tensor:
        """What an 'after the attack' ascent term maximises: raw, or capped."""
        return loss.clamp(max=self.cap_levels[role]) if self.config.target == "capped" else loss

    def _forget_after(self, params, ctx) -> tuple[torch.Tensor, float]:
        """The post-attack forget term to *minimise*, and the raw post-attack forget loss (logged)."""
        if self.config.target != "unlearn_target":
            loss = self._loss(self._batch(self.data.forget, ctx), params, ctx)
            return -self._ascent(loss, "forget"), loss.item()
        # Pull theta' back to the base method's unlearning target on its own x_t:
        # bounded below by zero, and it asks for exactly what unlearning asks for.
        cond = self.method.forget_batch(ctx)
        x_t, t = self.method.noised_x_t(ctx, len(cond))
        target = self.method.target(x_t, t, cond)
        loss = F.mse_loss(self.model.predict(x_t, t, cond, params).float(), target.float())
        return loss, loss.item()

    def __call__(self, ctx: StepContext) -> Terms:
        cfg, model = self.config, self.model
        second = cfg.mode == "second_order"
        theta = [self.trainable[n] for n in self.names]
        tau = self.inner_lr(ctx)
        forget = self._batch(self.data.forget, ctx)

        # The simulated attack. Second order keeps the graph of every inner
        # step; first order starts from (and re-detaches to) a copy.
        current = theta if second else [p.detach().requires_grad_(True) for p in theta]
        inner_norm = 0.0
        for _ in range(cfg.inner_steps):
            loss_in = self._loss(forget, dict(zip(self.names, current)), ctx)
            grads = torch.autograd.grad(loss_in, current, create_graph=second)
            inner_norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)).item()
            current = [p - tau * d for p, d in zip(current, inner_direction(list(grads), cfg.inner_step))]
            if not second:
                current = [p.detach().requires_grad_(True) for p in current]
        after = dict(zip(self.names, current))

        logs: dict[str, float] = {"meta/inner_lr": tau, "meta/inner_grad_norm": inner_norm,
                                                 "meta/forget_before": loss_in.item() if cfg.inner_steps else 0.0,
                                                 **{f"meta/cap_{k}": v for k, v in self.cap_levels.items()}}
        outer = torch.zeros((), device=model.device)
        if cfg.forget_after:
            term, raw = self._forget_after(after, ctx)
            outer = outer + cfg.forget_after * term
            logs["meta/forget_after"] = raw
        for weight, role, name in ((cfg.related_after, self.data.related, "related"),
                                   (cfg.unrelated_after, self.data.unrelated, "unrelated")):
            batch = self._batch(role, ctx)
            if weight and batch is not None:
                loss = self._loss(batch, after, ctx)
                outer = outer - weight * self._ascent(loss, name)
                logs[f"meta/{name}_after"] = loss.item()

        terms: dict[str, torch.Tensor] = {}
        if outer.requires_grad:
            if second:
                terms["meta_after"] = outer
            else:
                terms["meta_after"] = linear_surrogate(theta, torch.autograd.grad(outer, current))
            logs["meta/after_objective"] = outer.item()
        for weight, role, name in ((cfg.related_before, self.data.related, "related"),
                                   (cfg.unrelated_before, self.data.unrelated, "unrelated")):
            batch = self._batch(role, ctx)
            if weight and batch is not None:
                terms[f"meta_{name}_before"] = weight * self._loss(batch, None, ctx)
        return Terms(terms, logs)


def make_meta(config: MetaConfig, model: DiffusionModel, trainable, data: ConceptData, method: Method,
              batch_size: int) -> MetaObjective:
    if config.mode == "second_order":
        model.use_math_attention()  # no fused attention kernel (CPU flash, CUDA flash/efficient) has a double backward
    return MetaObjective(config, model, trainable, data, method, batch_size)
