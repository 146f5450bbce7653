"""ESD, Erased Stable Diffusion (Gandikota et al. 2023).

The student's prediction for the forget prompt c is regressed onto a
negatively guided prediction of the frozen original model:

    target = eps*(x_t, t, {}) - eta * (eps*(x_t, t, c) - eps*(x_t, t, {}))

ESD-u trains everything but cross-attention (params: noxattn), ESD-x only
cross-attention (xattn). The frozen teacher is the original values of the
trainable tensors run through the same UNet: the untrained part is shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import snapshot
from .base import Method, StepContext


class EsdMethod(Method):
    name = "esd"

    def setup(self, model, trainable, data) -> None:
        super().setup(model, trainable, data)
        self.teacher = snapshot(trainable)

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        model, eta = self.model, self.config.esd.eta
        both = type(cond).cat([self.uncond.expand(len(x_t)), cond])
        eps_u, eps_c = model.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both, self.teacher).chunk(2)
        return eps_u - eta * (eps_c - eps_u)

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config.esd
        cond = self.forget_batch(ctx)
        x_t, t = self.make_x_t(ctx, cond, cfg.x_t, cfg.ddim_steps, cfg.sample_guidance)
        pred = self.model.predict(x_t, t, cond)
        return {"esd": F.mse_loss(pred.float(), self.target(x_t, t, cond).float())}
