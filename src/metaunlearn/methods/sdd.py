"""SDD, Safe self-Distillation Diffusion (Kim et al. 2023).

The student's prediction for the forget prompt c is distilled onto the
unconditional prediction of an EMA teacher of itself:

    loss = || eps(x_t, t, c) - sg(eps_ema(x_t, t, g)) ||^2

with x_t from partial sampling of the EMA teacher with the forget prompt and
g the guide concept (`concepts.guide`; "" = the empty prompt, the paper's
choice). Mapping to the empty prompt leaves the concept at its share of the
unconditional distribution: harmless when that share is tiny (nudity in SD),
but in the digits world every digit is ~10% of unconditional samples, so a
study there names a guide digit instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..engine import StepContext, Terms
from ..params import snapshot
from ..registry import METHODS
from .base import Method, XtOptions, guide_conditioning


class SddOptions(XtOptions):
    ema_decay: float = Field(0.999, gt=0, lt=1, description="Decay of the EMA teacher.")


@METHODS.register("sdd", SddOptions, help="Safe self-Distillation Diffusion: distil onto an EMA teacher's guide")
class SddMethod(Method):
    has_target = True

    def setup(self, model, trainable, data) -> None:
        super().setup(model, trainable, data)
        self.ema = snapshot(trainable)
        self.guide = guide_conditioning(model, self.guide_prompt)

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.model.predict(x_t, t, self.guide.expand(len(x_t)), self.ema)

    def loss(self, ctx: StepContext) -> Terms:
        cond = self.forget_batch(ctx)
        x_t, t = self.forget_x_t(ctx, cond, self.options, params=self.ema)
        pred = self.model.predict(x_t, t, cond)
        return Terms({"sdd": F.mse_loss(pred.float(), self.target(x_t, t, cond).float())})

    @torch.no_grad()
    def after_step(self) -> None:
        decay = self.options.ema_decay
        for name, param in self.trainable.items():
            self.ema[name].lerp_(param.detach(), 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.ema:
            self.ema[name].copy_(state[f"ema.{name}"])
