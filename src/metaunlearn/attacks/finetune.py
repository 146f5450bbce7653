"""Finetuning attacks: every UNet weight ('full'), or a LoRA adapter ('lora', peft)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..errors import MetaunlearnError
from ..layout import atomic_dir
from ..params import make_trainable
from ..registry import ATTACKS, Options
from .base import Attack


@ATTACKS.register("full", help="finetune every UNet weight")
class FullFinetune(Attack):
    def trainable(self, model):
        return make_trainable(model.unet, "full")

    def save(self, model, out: Path) -> None:
        with atomic_dir(out / "model") as tmp:
            model.save(tmp)


class LoraOptions(Options):
    rank: int = Field(4, gt=0, description="LoRA rank.")
    alpha: float = Field(4.0, gt=0, description=(
        "LoRA alpha: the update is scaled by alpha / rank (diffusers' LoRA scripts set alpha = rank; give it with "
        "a rank other than 4)."))
    targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                               description="UNet module names LoRA adapts.")


@ATTACKS.register("lora", LoraOptions, help="finetune a LoRA adapter (peft) on the UNet")
class LoraFinetune(Attack):
    def trainable(self, model):
        from peft import LoraConfig

        opts, name = self.options, self.config.name
        model.unet.requires_grad_(False)
        try:
            model.unet.add_adapter(LoraConfig(r=opts.rank, lora_alpha=opts.alpha, init_lora_weights="gaussian",
                                              target_modules=list(opts.targets)))
        except ValueError as err:
            raise MetaunlearnError(f"attack '{name}': bad lora.targets {opts.targets}: {err}") from None
        params = {n: p for n, p in model.unet.named_parameters() if p.requires_grad}
        if not params:
            raise MetaunlearnError(f"attack '{name}': lora.targets {opts.targets} match no UNet module")
        return params

    def save(self, model, out: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        # loaders take a file without alpha as alpha = rank (scale 1): B is saved times alpha / rank, so the
        # adapter loads at the strength it was trained and evaluated with
        scale = self.options.alpha / self.options.rank
        layers = {k: v * scale if "lora_B" in k else v for k, v in get_peft_model_state_dict(model.unet).items()}
        with atomic_dir(out / "lora") as tmp:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers)
