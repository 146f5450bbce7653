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
from pydantic import Field

from ..engine import StepContext, Terms
from ..params import snapshot
from ..registry import METHODS
from .base import Method, XtOptions


class EsdOptions(XtOptions):
    eta: float = Field(1.0, description="Negative guidance η of the ESD target ε(∅) − η·(ε(c) − ε(∅)).")


@METHODS.register("esd", EsdOptions, help="Erased Stable Diffusion: negative guidance from the frozen original")
class EsdMethod(Method):
    has_target = True

    @classmethod
    def title(cls, config) -> str:
        """ESD-u / ESD-x by trained weights, with η when not 1 (the paper's ESD-u-3)."""
        params = cls.trained_params(config)
        kind = {"noxattn": "u", "xattn": "x"}.get(params, params)
        eta = config.options().eta
        return f"ESD-{kind}" + (f" (η={eta:g})" if eta != 1 else "")

    def setup(self, model, trainable, data) -> None:
        super().setup(model, trainable, data)
        self.teacher = snapshot(trainable, self.config.frozen_dtype)

    def frozen_original(self):
        return self.teacher

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.model.guided_prediction(x_t, t, cond, self.uncond, -self.options.eta, self.teacher)

    def loss(self, ctx: StepContext) -> Terms:
        cond = self.forget_batch(ctx)
        x_t, t = self.forget_x_t(ctx, cond, self.options)
        pred = self.model.predict(x_t, t, cond)
        return Terms({"esd": F.mse_loss(pred.float(), self.target(x_t, t, cond).float())})
