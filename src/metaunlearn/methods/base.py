"""What a base unlearning method is to the training loop: named loss terms
over the trainable UNet weights, plus optional state (an EMA teacher) that
checkpoints must carry. Loading, data, the loop, preservation and the meta
objective live elsewhere and are shared."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..config import MethodConfig
from ..data import ConceptData
from ..model import DiffusionModel


@dataclass
class StepContext:
    step: int
    generator: torch.Generator  # the only source of randomness of a step: resumes replay it exactly
    batch_size: int


class Method(ABC):
    name: str = ""

    def __init__(self, config: MethodConfig, guide: str = ""):
        self.config = config
        self.guide_prompt = guide  # the concept the forget concept maps to ("" = empty prompt)

    def setup(self, model: DiffusionModel, trainable: dict[str, torch.nn.Parameter], data: ConceptData) -> None:
        """Called once before the first step, with the weights still original."""
        self.model, self.trainable, self.data = model, trainable, data
        self.uncond = model.empty_conditioning()

    @abstractmethod
    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named loss terms of one step; the loop adds them up."""

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to update an EMA teacher)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    # Shared by methods that erase with prompts: the forget captions and x_t.
    def forget_batch(self, ctx: StepContext):
        forget = self.data.forget
        index = torch.randint(0, len(forget.prompts), (ctx.batch_size,), generator=ctx.generator)
        return forget.cond[index]

    def make_x_t(self, ctx: StepContext, cond, x_t_mode: str, ddim_steps: int, guidance: float,
                 params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t for the forget prompt: partial DDIM sampling (k ~ U{0..steps-1}
        steps; k = 0 is pure noise), or forget images noised to a random t."""
        model, n = self.model, len(cond)
        if x_t_mode == "sample":
            k = int(torch.randint(0, ddim_steps, (1,), generator=ctx.generator))
            seeds = torch.randint(0, 2**31 - 1, (n,), generator=ctx.generator).tolist()
            x_t, t = model.sample_latents(cond, seeds, steps=ddim_steps, guidance_scale=guidance,
                                          stop_after=k, params=params, uncond=self.uncond)
            return x_t, torch.full((n,), t, device=model.device, dtype=torch.long)
        latents, _ = self.data.forget.sample(n, ctx.generator)
        t = model.sample_timesteps(n, ctx.generator)
        return model.add_noise(latents.to(model.device, model.dtype), model.sample_noise(latents.shape, ctx.generator), t), t


def guide_conditioning(model: DiffusionModel, guide: str):
    return model.encode_prompts([guide]) if guide else model.empty_conditioning()


class NoMethod(Method):
    """`method: none`: no base loss, for a meta-only stage on an already
    unlearned model (the paper's route for UCE/RECE)."""

    name = "none"

    def loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}
