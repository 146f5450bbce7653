"""The meta-unlearning objective (PAPER.md, "The meta objective"), for any
base method.

Simulated attack (M inner steps on the forget data, step size tau; the
attacker is drawn per outer step from a family: simulated.py; with
`attackers_per_step` N, N attackers, and the post-attack terms their mean):

    theta' = theta - tau * step(grad L(theta; forget))

Meta loss, added to the base method's loss by the training engine:

    L_meta = - a * A(L(theta'; forget))      forget stays unlearned after the attack
             - b * A(L(theta'; related))     related concepts self-destruct after the attack
             + c * R(theta;  related)        related concepts stay good before it
             + d * R(theta;  unrelated)      unrelated concepts stay good before it
             + k * R(theta'; unrelated)      ... and after it: the self-destruct stays on related ones
             - e * A(L(theta'; unrelated))   the reference code's extra term (default off)

A bounds the ascent ("capped": no gradient once a post-attack loss exceeds
`cap` times the original model's loss on that role, measured at setup, so the
bound means the same at every model scale), or the forget term is replaced by
pulling the post-attack prediction to the base method's unlearning target
("unlearn_target"), bounded below by zero instead of unbounded. R keeps a
role intact: its denoising loss, or ("distill") the distance to the original
model's predictions on the same noised images. The post-attack terms are
taken after the last inner step, or along the whole trajectory with weights
growing toward its end.

Modes: `second_order` differentiates through the inner steps
(`torch.func.functional_call` over an ordered name -> tensor mapping,
`create_graph=True`); `first_order` evaluates the post-attack gradients on a
detached copy and adds them to theta's gradient through a zero-valued linear
surrogate, sum((theta - sg(theta)) * sg(g')), whose gradient is exactly g'.
First order in place (the default) runs the simulated attack on the UNet's own
weights instead: each inner gradient is applied tensor by tensor as the
backward pass completes it (never whole), the post-attack terms' backward
passes add to .grad directly, and theta comes back bit for bit from one
buffer: one copy of the trained weights beyond plain unlearning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .config import MetaConfig
from .data import ConceptData
from .engine import StepContext, Terms
from .errors import MetaunlearnError
from .methods.base import Method
from .model import DiffusionModel
from .params import snapshot
from .saliency import keep_salient, masked_gradient, salient_masks
from .simulated import WHOLE, Episode, LowRank, WarmAdam, draw, inner_direction, is_lora_target, trajectory_weights

REFERENCE_BATCHES = 4  # batches that measure the original model's loss per role (capped target)
AFTER_LOGS = {"meta/forget_after", "meta/related_after", "meta/unrelated_after", "meta/unrelated_kept"}  # _after's


class _GivenGradient(torch.autograd.Function):
    """Value 0; gradient w.r.t. each param its given tensor (times the output's gradient). A non-finite given
    gradient (an fp16 overflow) stays in the gradient, where fp16's loss scaler skips the step, and never
    reaches the value, where (p - p) * inf would make it NaN and stop the run."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, out):
        return (None, *[out * g for g in ctx.grads])


def linear_surrogate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Zero-valued term whose gradient w.r.t. params is `grads` (first-order meta)."""
    return _GivenGradient.apply([g.detach() for g in grads], *params)


class MetaObjective:
    """A training-engine objective: called every step with the step context."""

    def __init__(self, config: MetaConfig, model: DiffusionModel, trainable: dict[str, torch.nn.Parameter],
                 data: ConceptData, method: Method, batch_size: int):
        self.config, self.model, self.data, self.method = config, model, data, method
        self.names = list(trainable)  # module order: the mapping functional_call receives
        self.trainable = trainable
        # what the simulated attacker moves: the trained weights first, then (attacked 'all') the ones the
        # defence leaves frozen, which a real finetuner moves too
        frozen = {n: p for n, p in model.unet.named_parameters() if n not in trainable} \
            if config.attacked == "all" else {}
        self.attacked_names = self.names + list(frozen)
        self.attacked = [trainable[n] for n in self.names] + list(frozen.values())
        self.n_trained = len(self.names)
        self.batch_size = batch_size
        self.inner_batch = config.inner_batch or batch_size  # the simulated attacker's forget batch
        self.cap_levels = self._cap_levels() if config.target == "capped" else {}
        if config.target == "unlearn_target" and not method.has_target:
            raise MetaunlearnError(f"meta.target 'unlearn_target' needs a base method with a target, "
                                   f"not '{method.name}'")
        # the weights training starts from: what "distill" keeps related and unrelated data close to
        # (the base method's own frozen copy when it keeps one: one full copy of the weights less)
        frozen = method.frozen_original()
        shared = frozen is not None and set(frozen) == set(trainable)
        self.original = (frozen if shared else snapshot(trainable, method.config.frozen_dtype)) \
            if config.retain == "distill" else None
        self.in_place = config.in_place and config.mode == "first_order"
        self._backup: list[torch.Tensor] | None = None  # in place: theta during the simulated attack
        self._loss_scale = 1.0  # the engine's fp16 loss scale this step (StepContext.loss_scale)
        self.low_rank = LowRank(self.attacked_names, self.attacked, config.low_rank_rank) \
            if config.low_rank > 0 else None
        self.grad_reference = self._forget_grad_norm() if config.forget_sharpness else None
        self.episode = Episode(config.persistent) if config.persistent else None
        self.warm = WarmAdam() if "adam_warm" in config.forms else None  # a running Adam's moments (state)
        # not state: the engine builds this objective at the stage's starting weights, before a resume loads
        whole = frozenset(n for n, p in trainable.items() if is_lora_target(n, p)) \
            if config.salient_lora_targets else frozenset()
        self.salient = salient_masks(model, data.forget, data.unrelated, trainable, config.salient,
                                     self.inner_batch, whole) if config.salient is not None else None

    # Stateful (the engine checkpoints it): a persistent attacker's episode, a running Adam's moments
    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.episode.state_dict() if self.episode is not None else {}
        if self.warm is not None:
            state.update({f"warm.{k}": v for k, v in self.warm.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.episode is not None:
            self.episode.load_state_dict(state, self.attacked)
        if self.warm is not None:
            self.warm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("warm.")}, self.attacked)

    @contextmanager
    def _attackable(self):
        """The frozen weights the simulated attacker moves need gradients while it takes its steps."""
        frozen = self.attacked[self.n_trained:]
        for p in frozen:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(False)
                p.grad = None

    @contextmanager
    def _frozen_at_rest(self):
        """In place, the original model's predictions (a frozen copy of the trained weights only) run with
        the frozen weights the simulated attacker moved put back for the while."""
        moved = self.attacked[self.n_trained:] if self.in_place and self._backup is not None else []
        if not moved:  # attacked 'trained', or functional: nothing frozen has moved
            yield
            return
        # the backups lent to the weights, not copied in: nothing writes to them while the original predicts
        kept = [p.data for p in moved]
        for p, b in zip(moved, self._backup[self.n_trained:]):
            p.data = b
        torch.clear_autocast_cache()
        try:
            yield
        finally:
            for p, k in zip(moved, kept):
                p.data = k
            torch.clear_autocast_cache()

    def _draw(self, ctx) -> tuple:
        """This outer step's attacker, forget batch and LoRA-like A (a running episode's own attacker and A)."""
        episode = self.episode
        if episode is not None and episode.depth > 0:
            return episode.attacker, self._batch(self.data.forget, ctx, self.inner_batch), episode.a
        attacker = draw(self.config, ctx.generator)
        forget = self._batch(self.data.forget, ctx, self.inner_batch)
        a = self.low_rank.draw(ctx.generator, self.model.device) if attacker.low_rank else None
        if episode is not None:
            episode.attacker, episode.a = attacker, a
        return attacker, forget, a

    def _batch(self, role, ctx, size: int | None = None):
        return None if role is None or len(role) == 0 else role.sample(size or self.batch_size, ctx.generator)

    def _loss(self, batch, params, ctx) -> torch.Tensor:
        latents, cond = batch
        return self.model.denoising_loss(latents, cond, params=params, generator=ctx.generator)

    def _retain(self, batch, params, ctx) -> torch.Tensor:
        """R: how far a role is from intact at `params` (None: theta itself)."""
        if self.original is None:
            return self._loss(batch, params, ctx)
        model, (latents, cond) = self.model, batch
        latents = latents.to(model.device, model.dtype)
        noise = model.sample_noise(latents.shape, ctx.generator)  # the draws denoising_loss makes, in its order
        t = model.sample_timesteps(len(latents), ctx.generator)
        x_t = model.add_noise(latents, noise, t)
        with torch.no_grad(), self._frozen_at_rest():
            target = model.predict(x_t, t, cond, self.original)
        return F.mse_loss(model.predict(x_t, t, cond, params).float(), target.float())

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

    def _forget_grad_norm(self) -> float:
        """The original model's gradient norm of the forget loss (fixed batches): sharpness's unit."""
        gen, norms = torch.Generator().manual_seed(0), []
        for _ in range(REFERENCE_BATCHES):
            with self._attackable():  # over what the attacker moves, as the ratio's numerator
                # the inner steps' batch size: a gradient's norm shrinks with the batch it is averaged over
                loss = self.model.denoising_loss(*self.data.forget.sample(self.inner_batch, gen), generator=gen)
                norms.append(self._stream(loss, self.attacked, lambda *_: None, scaled=False))  # the norm only
        return sum(norms) / len(norms)

    def _sharpness(self, theta, at, grads, forget, ctx, state) -> tuple[torch.Tensor, float]:
        """A zero-valued term whose gradient is that of w * max(0, r^2 - cap^2), r = ||g|| / g_ref
        with g the forget gradient where the attack starts (`at`: theta, or theta + a persistent
        attacker's displacement): 2 w H g / g_ref^2 above the cap, H g by finite differences along g
        (the same batch, t and noise: the generator is replayed), so no double backward is needed."""
        norm = _norm(grads)
        # at or under the hinge; or an fp16 overflow (the scaler skips this step: no finite difference to take)
        if norm / self.grad_reference <= self.config.sharpness_cap or not math.isfinite(norm):
            return linear_surrogate(theta, [torch.zeros_like(p) for p in theta]), norm / self.grad_reference
        eps = self.config.fd_step * _norm(at) / max(norm, 1e-12)  # a step of fd_step x ||theta|| along g
        after = ctx.generator.get_state()
        ctx.generator.set_state(state)
        shifted = {n: p.detach() + eps * g for n, p, g in zip(self.attacked_names, at, grads)}
        trained = [shifted[n].requires_grad_(True) for n in self.names]  # d||g||^2/d theta = 2 (H g), theta's rows
        moved = self._grads(self._loss(forget, shifted, ctx), trained)
        ctx.generator.set_state(after)  # the rest of the step draws what it would have drawn
        scale = self._sharpness_scale(eps)
        given = [scale * (m - g) for m, g in zip(moved, grads)]
        return linear_surrogate(self._post_attack(theta), given), norm / self.grad_reference

    def _post_attack(self, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        """theta as the post-attack terms' gradients reach it through autograd (functional and second order):
        itself, or with meta.salient, through the masks (in place masks .grad instead: keep_salient)."""
        if self.salient is None:
            return theta
        return [masked_gradient(p, m) for p, m in zip(theta, self.salient)]

    def _sharpness_scale(self, eps: float) -> float:
        """d/dtheta of w * ||g||^2 / g_ref^2 is 2 w H g / g_ref^2, and H g = (g(theta + eps g) - g) / eps."""
        return 2 * self.config.forget_sharpness / self.grad_reference ** 2 / eps

    def _grads(self, loss: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
        """d loss / d inputs, backpropagated at the engine's fp16 loss scale (an SD-size denoising loss's
        activation gradients underflow in fp16 otherwise, as in the engine's own backward pass) and unscaled:
        the true gradient. Exactly autograd.grad without a scaler."""
        scale = self._loss_scale
        if scale == 1.0:
            return list(torch.autograd.grad(loss, inputs, create_graph=create_graph))
        grads = list(torch.autograd.grad(loss * scale, inputs, create_graph=create_graph))
        if create_graph:  # second order differentiates through the unscaling too
            return [g / scale for g in grads]
        return [g.div_(scale) for g in grads]  # in place: no second copy of the gradient

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
        with self._frozen_at_rest():
            target = self.method.target(x_t, t, cond)
        loss = F.mse_loss(self.model.predict(x_t, t, cond, params).float(), target.float())
        return loss, loss.item()

    def _after(self, params, ctx, backward: Callable[[torch.Tensor], None] | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
        """The post-attack terms at `params` (to minimise), and their raw losses (logged). With `backward`,
        each term goes to it as soon as it is computed, so one term's graph exists at a time (and no
        gradient waits in autograd's buffers for another graph's part of it), and the sum comes back
        detached."""
        cfg, logs = self.config, {}
        outer = torch.zeros((), device=self.model.device)

        def add(term: torch.Tensor) -> torch.Tensor:
            if backward is not None and term.requires_grad:
                backward(term)
            return outer + (term.detach() if backward is not None else term)

        if cfg.forget_after:
            term, raw = self._forget_after(params, ctx)
            outer = add(cfg.forget_after * term)
            logs["meta/forget_after"] = raw
        for weight, role, name in ((cfg.related_after, self.data.related, "related"),
                                   (cfg.unrelated_after, self.data.unrelated, "unrelated")):
            batch = self._batch(role, ctx)
            if weight and batch is not None:
                loss = self._loss(batch, params, ctx)
                outer = add(-(weight * self._ascent(loss, name)))
                logs[f"meta/{name}_after"] = loss.item()
        batch = self._batch(self.data.unrelated, ctx) if cfg.unrelated_kept else None
        if batch is not None:
            kept = self._retain(batch, params, ctx)
            outer = add(cfg.unrelated_kept * kept)
            logs["meta/unrelated_kept"] = kept.item()
        return outer, logs

    # In place (first order): the simulated attacker moves the UNet's own weights through .data, which
    # autograd does not version, and _restore copies theta back bit for bit before the terms taken at theta
    # (the engine has already backpropagated the base method's loss: no graph of it is alive). Autocast
    # caches casts of weights: cleared after every move, or a forward pass could run on the old values.
    def _save(self, theta: list[torch.Tensor]) -> None:
        if self._backup is None:  # one buffer for the whole run
            self._backup = [p.detach().clone() for p in theta]
        else:
            for b, p in zip(self._backup, theta):
                b.copy_(p.detach())

    @torch.no_grad()
    def _move(self, theta: list[torch.Tensor], directions: list[torch.Tensor], scale: float) -> None:
        for p, d in zip(theta, directions):  # d * scale first, as the functional path computes it: same bits
            p.data.add_(d * scale)
        torch.clear_autocast_cache()

    @torch.no_grad()
    def _restore(self, theta: list[torch.Tensor]) -> None:
        for p, b in zip(theta, self._backup):
            p.data.copy_(b)
        torch.clear_autocast_cache()

    @torch.no_grad()
    def _start(self, theta: list[torch.Tensor], restore: bool = True) -> None:
        """To where this step's simulated attack starts: theta, plus a running episode's displacement."""
        if restore:
            self._restore(theta)
        offset = self.episode.offset if self.episode is not None else None
        if offset is not None:
            for p, d in zip(theta, offset):
                p.data.add_(d)
            torch.clear_autocast_cache()

    def _stream(self, loss: torch.Tensor, theta: list[torch.Tensor], consume: Consumer, scaled: bool = True) -> float:
        """loss.backward(), each trained tensor's gradient handed to consume(i, p, g, aside) as soon as
        the backward pass completes it, then dropped: the gradient never exists whole. Meanwhile the
        gradients collected so far stand aside (`aside`, which consume may add to). Moving p in consume
        is safe: a tensor's gradient is complete only once every node that used it has run (and
        non-reentrant checkpointing recomputes a block before any of its tensors' gradients are done).
        With `scaled`, the pass runs at the fp16 loss scale and g is unscaled (see _grads). Returns the
        gradient's norm, summed in theta's order as _norm sums."""
        aside, squares = [p.grad for p in theta], [torch.zeros(())] * len(theta)
        scale = self._loss_scale if scaled else 1.0

        def hook(i: int):
            def fire(p: torch.Tensor) -> None:
                g, p.grad = p.grad, None
                if scale != 1.0:
                    g.div_(scale)
                squares[i] = (g.detach().float() ** 2).sum()
                with torch.no_grad():
                    consume(i, p, g, aside)
            return fire

        for p in theta:
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(hook(i)) for i, p in enumerate(theta)]
        try:
            (loss if scale == 1.0 else loss * scale).backward(inputs=theta)
        finally:
            for handle in handles:
                handle.remove()
            for p, g in zip(theta, aside):
                p.grad = g
            torch.clear_autocast_cache()
        return torch.sqrt(sum(squares)).item()

    def _inner_in_place(self, theta, forget, attacker, a, ctx, feed: bool = True) -> tuple[float, float]:
        """One simulated attacker step on the weights it moves (`theta` here: self.attacked) themselves;
        returns the forget loss before it and its gradient's norm. The update forms that act tensor by
        tensor stream; 'normalized' and 'rms' need the whole gradient's norm. With `feed` (not when a step
        is taken again on the same batch) its gradients feed the running Adam's moments."""
        with self._attackable():
            return self._inner_step_in_place(theta, forget, attacker, a, ctx, self.warm if feed else None)

    def _inner_step_in_place(self, theta, forget, attacker, a, ctx, warm: WarmAdam | None) -> tuple[float, float]:
        loss = self._loss(forget, None, ctx)
        if attacker.form in WHOLE:
            grads = self._grads(loss, theta)
            norm = _norm(grads)
            for i, g in enumerate(grads if warm is not None else ()):
                warm.feed(i, g)
            self._move(theta, self.low_rank.direction(grads, attacker.form, a) if a is not None else
                       inner_direction(grads, attacker.form, in_place=True), -attacker.lr)
            return loss.item(), norm
        # a LoRA-like attacker's adapter starts afresh, so its first step is Adam's first
        form = "adam" if attacker.form == "adam_warm" and a is not None else attacker.form

        def step(i, p, g, aside):
            if warm is not None:
                warm.feed(i, g)  # before a form that works in g's memory
            if form == "adam_warm":
                d = self.warm.direction(i, g)
            else:
                d = LowRank.direction_of(g, form, a[i]) if a is not None else \
                    inner_direction([g], form, in_place=True)[0]
            if d is not None:
                p.data.add_(d * -attacker.lr)  # d * scale first, as the functional path computes it: same bits

        return loss.item(), self._stream(loss, theta, step)

    def _sharpness_in_place(self, theta, forget, ctx, state, norm: float) -> None:
        """The sharpness term's gradient (see _sharpness) added to .grad with g never whole: a streamed pass
        at theta adds -s g to .grad and moves theta to theta + eps g, tensor by tensor; a second pass there
        adds s g(theta + eps g); theta is then put back. Both replay the generator from `state`."""
        eps = self.config.fd_step * _norm(theta) / max(norm, 1e-12)
        scale = self._sharpness_scale(eps) * self._loss_scale
        n = self.n_trained  # every attacked weight moves along g; the trained ones' .grad take the term

        def shift(i, p, g, aside):
            p.data.add_(eps * g)
            if i < n:
                aside[i] = g.mul_(-scale) if aside[i] is None else aside[i].add_(g, alpha=-scale)

        ctx.generator.set_state(state)
        with self._attackable():
            self._stream(self._loss(forget, None, ctx), theta, shift)

        # the multiplier goes on the parameters' gradients, as in the first pass: the loss times it would
        # scale fp16 activation gradients by ~1e3, past the loss scale's overflow margin
        def add(i, p, g, aside):
            aside[i] = g.mul_(scale) if aside[i] is None else aside[i].add_(g, alpha=scale)

        ctx.generator.set_state(state)
        self._stream(self._loss(forget, None, ctx), theta[:n], add)
        self._start(theta)

    def _attack_in_place(self, theta, forget, attacker, a, ctx, logs, share: float = 1.0,
                         sharpness: bool = True) -> float:
        """First order in place: the simulated attack on the weights themselves (`theta` here: all it
        moves); the post-attack terms' gradients, times `share` (one attacker's of several), and the
        sharpness term's (with `sharpness`) are added to the trained weights' .grad. Returns the post-attack
        objective (logged)."""
        cfg, total = self.config, torch.zeros((), device=self.model.device)  # summed as the functional path sums
        for k, weight in enumerate(trajectory_weights(attacker.steps, cfg.trajectory)):
            state = ctx.generator.get_state()
            loss, norm = self._inner_in_place(theta, forget, attacker, a, ctx)
            if k == 0:
                logs.update({"meta/forget_before": loss, "meta/inner_grad_norm": norm})
                if cfg.forget_sharpness and sharpness:
                    logs["meta/forget_grad_ratio"] = norm / self.grad_reference
                    # back, the penalty, the step again (not after an fp16 overflow: the scaler skips the step)
                    if cfg.sharpness_cap < norm / self.grad_reference < math.inf:
                        self._start(theta)
                        self._sharpness_in_place(theta, forget, ctx, state, norm)
                        ctx.generator.set_state(state)
                        self._inner_in_place(theta, forget, attacker, a, ctx, feed=False)  # fed already
            if not weight:
                continue
            outer, point_logs = self._after(None, ctx, self._backward_scaled(theta[:self.n_trained], weight * share))
            logs.update(point_logs)  # the last point's
            total = total + weight * outer
        return total.item()

    def _backward_scaled(self, theta, weight: float = 1.0) -> Callable[[torch.Tensor], None]:
        """A backward pass of weight x a term into theta's .grad, scaled as the engine scales losses."""
        return lambda term: (term * (weight * self._loss_scale)).backward(inputs=theta)

    def __call__(self, ctx: StepContext) -> Terms:
        self._loss_scale = ctx.loss_scale  # what the engine's backward passes multiply losses by (fp16)
        if not self.in_place:
            return self._step(ctx)
        self._save(self.attacked)
        try:
            return self._step(ctx)
        finally:
            self._restore(self.attacked)

    def _step(self, ctx: StepContext) -> Terms:
        cfg = self.config
        theta = [self.trainable[n] for n in self.names]
        logs: dict[str, float] = {"meta/attack_depth": float(self.episode.depth + 1)} if self.episode else {}
        terms: dict[str, torch.Tensor] = {}
        share, after_objective = 1.0 / cfg.attackers_per_step, 0.0  # several attackers: their mean
        # first order, functional: every attacker's post-attack gradients summed into one buffer
        collected = [torch.zeros_like(p) for p in theta] if not self.in_place and cfg.mode == "first_order" \
            else None
        # meta.salient: the post-attack terms' gradients reach the salient elements only (in place, into .grad)
        prior = [None if p.grad is None else p.grad.detach().clone() for p in theta] \
            if self.salient is not None and self.in_place else None
        for j in range(cfg.attackers_per_step):  # the sharpness term is theta's own: taken with the first
            attacker, forget, a = self._draw(ctx)
            if self.in_place:
                self._start(self.attacked, restore=False)
                after = self._attack_in_place(self.attacked, forget, attacker, a, ctx, logs, share, j == 0)
                if self.episode is not None:
                    self.episode.advance(self._backup, self.attacked)
                self._restore(self.attacked)  # back to theta: the next attack, and the terms taken before any
            else:
                after = self._attack_functional(theta, forget, attacker, a, ctx, logs, terms, collected, share,
                                                j == 0)
            after_objective += share * after
        if prior is not None:
            keep_salient(theta, prior, self.salient)
        after_terms = bool(logs.keys() & AFTER_LOGS)  # a post-attack term was taken
        if collected is not None and after_terms:
            terms["meta_after"] = linear_surrogate(self._post_attack(theta), collected)
        elif self.in_place and (after_terms or "meta/forget_grad_ratio" in logs):  # its gradients are in .grad
            terms["meta_after"] = torch.zeros((), device=self.model.device)  # already: the surrogates' value, 0
        logs.update({"meta/inner_lr": attacker.lr, "meta/inner_steps": float(attacker.steps),
                     "meta/low_rank": float(attacker.low_rank),  # the last attacker's
                     **{f"meta/cap_{k}": v for k, v in self.cap_levels.items()}})
        if after_terms:
            logs["meta/after_objective"] = after_objective
        for weight, role, name in ((cfg.related_before, self.data.related, "related"),
                                   (cfg.unrelated_before, self.data.unrelated, "unrelated")):
            batch = self._batch(role, ctx)
            if weight and batch is not None:
                term = weight * self._retain(batch, None, ctx)
                if self.in_place:  # backpropagated here, one graph at a time; the engine logs the value
                    self._backward_scaled(theta)(term)
                    term = term.detach()
                terms[f"meta_{name}_before"] = term
        return Terms(terms, logs)

    def _attack_functional(self, theta, forget, attacker, a, ctx, logs, terms, collected, share: float = 1.0,
                           sharpness: bool = True) -> float:
        """The simulated attack on copies of theta. Second order keeps the graph of every inner step (of every
        attacker of the step, until the engine's backward pass) and adds the post-attack term, times `share`
        (one attacker's of several), to `terms`; first order starts from (and re-detaches to) a copy and adds
        the post-attack gradients, weighted along the trajectory and by `share`, to `collected` (the
        surrogate's). The sharpness term goes to `terms` with `sharpness`. Returns the post-attack objective."""
        cfg = self.config
        second = cfg.mode == "second_order"
        offset = self.episode.offset if self.episode is not None else None
        moved, n = self.attacked, self.n_trained
        start = moved if offset is None else [p + d for p, d in zip(moved, offset)]
        # second order: the graph through theta's own tensors; the frozen ones the attacker moves are leaves
        current = self._post_attack(start[:n]) + start[n:] if second else start
        current = [p if second and i < n else p.detach().requires_grad_(True) for i, p in enumerate(current)]
        outer_total = torch.zeros((), device=self.model.device)
        for k, weight in enumerate(trajectory_weights(attacker.steps, cfg.trajectory)):
            state = ctx.generator.get_state() if k == 0 and cfg.forget_sharpness and sharpness else None
            loss_in = self._loss(forget, dict(zip(self.attacked_names, current)), ctx)
            grads = self._grads(loss_in, current, create_graph=second)
            if k == 0:
                logs.update({"meta/forget_before": loss_in.item(), "meta/inner_grad_norm": _norm(grads)})
            if state is not None:
                terms["meta_sharpness"], logs["meta/forget_grad_ratio"] = self._sharpness(
                    theta, [p.detach() for p in start], [g.detach() for g in grads], forget, ctx, state)
            step = self.low_rank.direction(grads, attacker.form, a) if a is not None else \
                inner_direction(grads, attacker.form)
            current = [p - attacker.lr * d for p, d in zip(current, step)]
            if not second:
                current = [p.detach().requires_grad_(True) for p in current]
            if not weight:
                continue
            outer, point_logs = self._after(dict(zip(self.attacked_names, current)), ctx)
            logs.update(point_logs)  # the last point's
            if second:
                outer_total = outer_total + weight * outer
            else:
                outer_total = outer_total + weight * outer.detach()
                if outer.requires_grad:
                    for total, g in zip(collected, self._grads(outer, current[:n])):
                        total.add_(g, alpha=weight * share)
        if self.episode is not None:
            self.episode.advance(moved, current)
        if second and outer_total.requires_grad:
            term = outer_total if share == 1.0 else share * outer_total
            if not torch.isfinite(term):  # an fp16 overflow: a NaN gradient for the scaler to skip, no NaN value
                term = linear_surrogate(theta, [torch.full_like(p, math.nan) for p in theta])
            terms["meta_after"] = terms["meta_after"] + term if "meta_after" in terms else term
        return outer_total.item()


Consumer = Callable[[int, torch.Tensor, torch.Tensor, list], None]  # (index, tensor, its gradient, aside)


def _norm(tensors) -> float:
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors)).item()


def make_meta(config: MetaConfig, model: DiffusionModel, trainable, data: ConceptData, method: Method,
              batch_size: int) -> MetaObjective:
    if config.mode == "second_order":
        model.use_math_attention()  # no fused attention kernel (CPU flash, CUDA flash/efficient) has a double backward
    return MetaObjective(config, model, trainable, data, method, batch_size)
