"""Trainable-parameter selections of a UNet, by name.

The selections follow ESD's naming: ESD-x trains cross-attention only, ESD-u
("noxattn") everything except cross-attention and, as the ESD code does, the
time embedding and the output layers. Selections are lists of parameter names
in module order, so the meta objective can build an ordered name -> tensor
mapping for `torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import MetaunlearnError

_OUTPUT_LAYERS = ("time_embedding.", "conv_out.", "conv_norm_out.")

SELECTIONS: dict[str, Callable[[str], bool]] = {
    "full": lambda name: True,
    "xattn": lambda name: ".attn2." in name,
    "noxattn": lambda name: ".attn2." not in name and not name.startswith(_OUTPUT_LAYERS),
    "selfattn": lambda name: ".attn1." in name,
}


def select_names(unet: torch.nn.Module, selection: str) -> list[str]:
    if selection not in SELECTIONS:
        raise MetaunlearnError(f"unknown parameter selection '{selection}'; choose one of {', '.join(SELECTIONS)}")
    names = [name for name, _ in unet.named_parameters() if SELECTIONS[selection](name)]
    if not names:
        raise MetaunlearnError(f"the selection '{selection}' matches no UNet parameter")
    return names


def make_trainable(unet: torch.nn.Module, selection: str) -> dict[str, torch.nn.Parameter]:
    """Freeze the whole UNet, then unfreeze the selection: frozen weights then
    accumulate no gradient (the reference code let them)."""
    names = set(select_names(unet, selection))
    unet.requires_grad_(False)
    trainable = {}
    for name, param in unet.named_parameters():
        if name in names:
            param.requires_grad_(True)
            trainable[name] = param
    return trainable


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy: the frozen teacher of ESD needs only the trainable
    tensors, the rest of the UNet is shared and never changes."""
    return {name: p.detach().clone() for name, p in params.items()}
