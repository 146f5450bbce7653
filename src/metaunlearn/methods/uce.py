"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024).

A closed-form edit of every cross-attention key and value projection W: the
forget prompts' text embeddings c_e are mapped to what W makes of the guide
concept's (v_e = W c_guide), other concepts' embeddings c_p keep their output
(W c_p), and W stays close to itself:

    W' = argmin  lam ||W' - W||^2 + s_e sum ||W' c_e - v_e||^2 + s_p sum ||W' c_p - W c_p||^2
       = [lam W + s_e sum v_e c_e^T + s_p sum (W c_p) c_p^T] [lam I + s_e sum c_e c_e^T + s_p sum c_p c_p^T]^-1

solved in float64 per projection. Keys are token embeddings of the prompts'
encoder output (SDXL: both encoders' widths concatenated, as its UNet sees
them): from the last content token on (it and the end/padding tokens after
it, which carry the prompt's meaning in CLIP; the UCE code's choice), or every
token, position by position. With the meta objective, the meta stage follows
the edit; `meta_route` says what holds the edit in place meanwhile.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..engine import StepContext, Terms
from ..params import LowPrecisionCopy, snapshot
from ..registry import METHODS, Options
from .base import Method, guide_conditioning

ROLES_TO_PRESERVE = ("related", "unrelated")


class UceOptions(Options):
    lam: float = Field(0.5, gt=0, description="Weight of staying close to the original projection.")
    erase_scale: float = Field(1.0, ge=0, description="s_e: weight of mapping the forget keys to the guide.")
    preserve_scale: float = Field(1.0, ge=0, description="s_p: weight of keeping the preserved keys' outputs.")
    tokens: Literal["last", "every"] = Field("last", description=(
        "Erase keys: from each forget prompt's last content token on (with the end and padding tokens), or "
        "every token, aligned by position with the guide's."))
    preserve: list[Literal["related", "unrelated"]] = Field(list(ROLES_TO_PRESERVE), description=(
        "Roles whose prompts' token embeddings keep their outputs (every token)."))
    meta_route: Literal["paper", "anchor", "reapply"] = Field("anchor", description=(
        "With meta on: 'paper' finetunes after the edit with nothing holding it; 'anchor' adds a loss keeping "
        "the edited projections' outputs for the erase keys at their targets; 'reapply' solves the edit again "
        "on the weights the meta stage leaves."))
    anchor_weight: float = Field(1.0, ge=0, description="Weight of the anchor term (meta_route 'anchor').")
    output_anchor_weight: float = Field(0.0, ge=0, description=(
        "With meta_route 'anchor': weight of keeping the whole UNet's predictions for the forget prompts (on "
        "forget images noised to a random t) at the edited model's, as ESD's loss keeps its target."))
    esd_weight: float = Field(0.0, ge=0, description=(
        "With meta on: weight of ESD's loss beside the meta objective, the forget prompts' predictions (on "
        "forget images noised to a random t) regressed onto the pre-edit model's negatively guided one "
        "(eta 1), so the meta stage keeps unlearning as a loss-based method's does."))


def projections(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key and value projection, by parameter name of its weight."""
    return {f"{name}.weight": module for name, module in unet.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v"))}


def solve(weight: torch.Tensor, erase_keys: torch.Tensor, erase_values: torch.Tensor, preserve_keys: torch.Tensor,
          lam: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """UCE's closed form for one projection (out x d), in float64: keys (n, d), values (n, out)."""
    w = weight.double()
    ce, ve, cp = erase_keys.double(), erase_values.double(), preserve_keys.double()
    a = lam * w + erase_scale * ve.T @ ce + preserve_scale * w @ (cp.T @ cp)
    b = lam * torch.eye(w.shape[1], dtype=torch.float64, device=w.device) + erase_scale * ce.T @ ce + \
        preserve_scale * cp.T @ cp
    return torch.linalg.solve(b, a.T).T.to(weight.dtype)  # a b^-1, b symmetric


def aligned_keys(hidden: torch.Tensor, counts: list[int], guide: torch.Tensor, guide_count: int,
                 tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase keys, guide keys): token embeddings of each prompt (hidden: P x L x d) paired with the
    guide's (L x d) at the same offset from each one's last content token, or position by position."""
    keys, guides = [], []
    length = hidden.shape[1]
    for prompt, count in zip(hidden, counts):
        if tokens == "every":
            keys.append(prompt)
            guides.append(guide)
            continue
        last, guide_last = max(count - 2, 0), max(guide_count - 2, 0)
        span = length - max(last, guide_last)  # as many tokens as both have from their last content token on
        keys.append(prompt[last:last + span])
        guides.append(guide[guide_last:guide_last + span])
    return torch.cat(keys), torch.cat(guides)


@METHODS.register("uce", UceOptions, help="Unified Concept Editing: closed-form edit of cross-attention K and V")
class UceMethod(Method):
    closed_form = True
    has_target = True  # the edited model's prediction (meta.target 'unlearn_target', the output anchor)
    # a meta stage on the edited model trains every weight, the projections held by `meta_route`.
    # Against freezing them (noxattn) the evidence is mixed (bench/RESULTS.md, issue 11): better on
    # the eight at lr 3e-5, equal on the five at 1e-4, worse on the five at 3e-5 (windows of a few
    # percent); every weight kept unrelated accuracy after the attack higher on both.
    default_params = "full"

    def keys(self, model, data) -> dict[str, torch.Tensor]:
        """The erase keys, the guide keys they map to, and the preserve keys (float32, on the model's device)."""
        opts, forget = self.options, data.forget
        guide_cond = guide_conditioning(model, self.guide_prompt)
        erase, guide = aligned_keys(forget.cond.hidden, model.token_counts(forget.prompts), guide_cond.hidden[0],
                                    model.token_counts([self.guide_prompt])[0], opts.tokens)
        kept = [getattr(data, role).cond.hidden.flatten(0, 1) for role in opts.preserve
                if getattr(data, role) is not None and len(getattr(data, role))]
        width = erase.shape[-1]
        preserve = torch.cat(kept) if kept else erase.new_zeros(0, width)
        return {k: v.to(model.device, torch.float32) for k, v in
                {"erase": erase, "guide": guide, "preserve": preserve}.items()}

    def edit(self, model, data, judge=None) -> None:
        self.apply(model, self.keys(model, data))

    @torch.no_grad()
    def apply(self, model, keys: dict[str, torch.Tensor], original: dict[str, torch.Tensor] | None = None) -> None:
        """Solve every projection; targets are what the `original` weights (default: the current
        ones, kept as self.original) make of the guide keys."""
        opts = self.options
        layers = projections(model.unet)
        if original is None:
            self.original = {n: m.weight.detach().clone() for n, m in layers.items()}
            original = self.original
        self.set_targets(keys, original)
        for name, module in layers.items():
            module.weight.copy_(solve(original[name], keys["erase"], self.targets[name], keys["preserve"], opts.lam,
                                      opts.erase_scale, opts.preserve_scale))

    def set_targets(self, keys: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
        """The solved keys and what the original projections make of their guide keys: what the
        anchor and reapply routes of a meta stage hold the edit to."""
        self.solved_keys = keys
        self.targets = {n: keys["guide"] @ w.float().T for n, w in original.items()}

    def setup(self, model, trainable, data) -> None:
        super().setup(model, trainable, data)
        # the weights the meta stage starts from (the edit): also the meta objective's original, one copy
        self.edited = snapshot(trainable, self.config.frozen_dtype)
        if self.options.esd_weight:  # the model before the edit, for ESD's target: the projections swapped back
            low = isinstance(self.edited, LowPrecisionCopy)
            dtype = getattr(torch, self.config.frozen_dtype)
            self.before_edit = type(self.edited)(
                {**self.edited, **{n: w.to(dtype) if low else w for n, w in self.original.items()}})

    def frozen_original(self):
        return self.edited

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.model.predict(x_t, t, cond, self.edited)

    def loss(self, ctx: StepContext) -> Terms:
        """During a meta stage with route 'anchor': the edited projections' outputs for the erase keys
        stay at the edit's targets (a no-op when the projections are not trained), and, weighted by
        `output_anchor_weight`, the forget prompts' predictions stay at the edited model's."""
        opts, terms = self.options, {}
        if opts.esd_weight:
            terms["uce_esd"] = opts.esd_weight * self.forget_regression(ctx, self.esd_target)
        if opts.meta_route != "anchor":
            return Terms(terms)
        trained = [n for n in self.targets if n in self.trainable]
        if opts.anchor_weight and trained:
            erase = self.solved_keys["erase"]
            # float32 like the keys and targets, whatever the weights' dtype (bf16 without autocast) and outside
            # any caller's autocast: bf16/fp16 rounding of the outputs is the size of the drift near the edit
            with torch.autocast(erase.device.type, enabled=False):
                drift = sum(((erase @ self.trainable[n].float().T - self.targets[n]) ** 2).mean() for n in trained)
            terms["uce_anchor"] = opts.anchor_weight * drift / len(trained)
        if opts.output_anchor_weight:
            terms["uce_output_anchor"] = opts.output_anchor_weight * self.forget_regression(ctx, self.target)
        return Terms(terms)

    def forget_regression(self, ctx: StepContext, target) -> torch.Tensor:
        """The UNet's predictions for a batch of forget prompts, on forget images noised to a random t,
        regressed onto `target(x_t, t, cond)`."""
        cond = self.forget_batch(ctx)
        x_t, t = self.noised_x_t(ctx, len(cond))
        return F.mse_loss(self.model.predict(x_t, t, cond).float(), target(x_t, t, cond).float())

    @torch.no_grad()
    def esd_target(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """ESD's negatively guided target (eta 1) from the model before the edit: the stage's starting
        weights with every edited projection's original value in place, trained or not."""
        return self.model.guided_prediction(x_t, t, cond, self.uncond, -1.0, self.before_edit)

    def finish(self, model, data) -> None:
        """Route 'reapply': solve again on the weights the meta stage left, toward the first edit's targets;
        only after a stage that trained the projections (the edit is no fixed point of its own solve: a
        second solve on unchanged weights would erase further, and a base model would not be UCE's)."""
        trained = getattr(self, "trainable", {})
        if self.options.meta_route == "reapply" and hasattr(self, "solved_keys") and \
                any(n in trained for n in self.targets):
            keys, opts = self.solved_keys, self.options
            with torch.no_grad():
                for name, module in projections(model.unet).items():
                    module.weight.copy_(solve(module.weight, keys["erase"], self.targets[name], keys["preserve"],
                                              opts.lam, opts.erase_scale, opts.preserve_scale))
