"""What a base unlearning method is to the rest of metaunlearn.

Two families share one interface:
- loss-based (ESD, SDD): `loss(ctx)` returns the method's loss terms at every
  training step, over the trainable UNet weights;
- closed-form (UCE, RECE): `edit(model, data)` changes the weights once,
  before any training step; with the meta objective enabled the edited model
  then goes through a meta stage (the same engine, the method adding no loss).

Optional capabilities are declared here with their defaults: `target` (the
prediction the method regresses the forget prompt onto, for meta's
'unlearn_target'), state that checkpoints must carry (an EMA teacher), and a
hook after each optimizer step. Loading, data, the loop, preservation and the
meta objective live elsewhere and are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..config import MethodConfig
from ..data import ConceptData
from ..engine import StepContext, Terms
from ..model import DiffusionModel
from ..registry import Options


class Method:
    closed_form: ClassVar[bool] = False  # True: `edit` does the unlearning, no training steps of its own
    needs_meta: ClassVar[bool] = False  # True: nothing to do without the meta objective ('none')
    has_target: ClassVar[bool] = False  # True: `target` is implemented
    judges_edits: ClassVar[bool] = False  # True: `edit` chooses between candidates by the forget rate (RECE)
    default_params: ClassVar[str] = "noxattn"  # the trained weights `params: auto` stands for

    def __init__(self, config: MethodConfig, guide: str = ""):
        self.config = config
        self.options: Options = config.options()
        self.guide_prompt = guide  # the concept the forget concept maps to ("" = empty prompt)

    @property
    def name(self) -> str:
        return self.config.name

    @classmethod
    def trained_params(cls, config: MethodConfig) -> str:
        """The UNet weights training changes: `config.params`, or the method's choice for 'auto'."""
        return cls.default_params if config.params == "auto" else config.params

    def record(self) -> dict:
        """What the run's run.json keeps of the method's own choices (RECE: its rounds)."""
        return {}

    @classmethod
    def title(cls, config: MethodConfig) -> str:
        """How reports name the method with these settings."""
        return config.name.upper()

    def setup(self, model: DiffusionModel, trainable: dict[str, torch.nn.Parameter], data: ConceptData) -> None:
        """Called once before the first step (after `edit`), with the weights the training starts from."""
        self.model, self.trainable, self.data = model, trainable, data
        self.uncond = model.empty_conditioning()

    def edit(self, model: DiffusionModel, data: ConceptData, judge: Callable[[], float] | None = None) -> None:
        """Closed-form methods: change the model's weights in place (deterministic:
        a resumed run applies it again before loading its checkpoint). `judge()` is the
        forget rate of the model as it stands, on held-out samples, for methods that
        choose between candidate edits."""

    def finish(self, model: DiffusionModel, data: ConceptData) -> None:
        """Called after the last training step (with the meta objective: after the meta stage)."""

    def loss(self, ctx: StepContext) -> Terms:
        """Loss-based methods: named loss terms of one step."""
        return Terms()

    def target(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' has no target prediction")

    def frozen_original(self) -> dict[str, torch.Tensor] | None:
        """The trained tensors' values before training, if the method keeps them (ESD's teacher):
        the meta objective shares them instead of keeping a second copy."""
        return None

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

    def forget_x_t(self, ctx: StepContext, cond, options: XtOptions,
                   params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t for the forget prompts `cond`, as `options.x_t` says: partial DDIM
        sampling (k ~ U{0..steps-1} steps, k = 0 is pure noise) with the model's
        weights or `params`, or forget images noised to a random t."""
        model, n = self.model, len(cond)
        if options.x_t == "noised":
            return self.noised_x_t(ctx, n)
        k = int(torch.randint(0, options.ddim_steps, (1,), generator=ctx.generator))
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=ctx.generator).tolist()
        x_t, t = model.sample_latents(cond, seeds, steps=options.ddim_steps, guidance_scale=options.sample_guidance,
                                      stop_after=k, params=params, uncond=self.uncond)
        return x_t, torch.full((n,), t, device=model.device, dtype=torch.long)

    def noised_x_t(self, ctx: StepContext, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t as forget images noised to a random t."""
        model = self.model
        latents, _ = self.data.forget.sample(n, ctx.generator)
        t = model.sample_timesteps(n, ctx.generator)
        noise = model.sample_noise(latents.shape, ctx.generator)
        return model.add_noise(latents.to(model.device, model.dtype), noise, t), t


class XtOptions(Options):
    """How a prompt-based method gets x_t for the forget prompt."""

    x_t: Literal["sample", "noised"] = Field("sample", description=(
        "'sample': partial DDIM sampling with the forget prompt (the paper; ESD samples the student, SDD its "
        "EMA teacher); 'noised': forget images noised to a random t (cheaper)."))
    ddim_steps: int = Field(50, gt=0, description="DDIM steps of the partial sampling that makes x_t.")
    sample_guidance: float = Field(3.0, ge=0, description="Guidance scale of that partial sampling.")


def guide_conditioning(model: DiffusionModel, guide: str):
    return model.encode_prompts([guide]) if guide else model.empty_conditioning()
