"""Trainable-parameter selections of a UNet, by name.

The selections follow ESD's naming: ESD-x trains cross-attention only, ESD-u
("noxattn") everything except cross-attention and, as the ESD code does, the
time embedding (SDXL's added conditioning embedding with it) and the output
layers. Selections are lists of parameter names in module order, so the meta
objective can build an ordered name -> tensor mapping for
`torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .errors import MetaunlearnError

# SDXL's add_embedding (its pooled text and size conditioning, added to the time embedding) is the time
# embedding's part there
_OUTPUT_LAYERS = ("time_embedding.", "add_embedding.", "conv_out.", "conv_norm_out.")

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


class LowPrecisionCopy(dict):
    """A frozen copy of some UNet tensors kept in a lower precision (bfloat16 or float16: half the
    memory of float32). DiffusionModel.predict runs it layer by layer, each layer's tensors cast up to
    the UNet's dtype only while that layer runs: the original model with its weights rounded."""


def snapshot(params: dict[str, torch.Tensor], dtype: str = "float32") -> dict[str, torch.Tensor]:
    """A detached copy: the frozen teacher of ESD needs only the trainable
    tensors, the rest of the UNet is shared and never changes. `dtype` 'float32'
    (method.frozen_dtype's default): the tensors as they are, whatever their dtype;
    a half-precision dtype: a LowPrecisionCopy (never a wider copy of narrower tensors)."""
    low = getattr(torch, dtype)
    if dtype == "float32" or all(p.dtype == low for p in params.values()):
        return {name: p.detach().clone() for name, p in params.items()}
    return LowPrecisionCopy({name: p.detach().to(low) for name, p in params.items()})


@contextlib.contextmanager
def swapped_in_per_layer(unet: torch.nn.Module, copy: LowPrecisionCopy):
    """Run `unet` with `copy` in place of its tensors, without gradients: a hook before each layer that
    owns some swaps its tensors' data for the copy's, cast up, and one after it swaps them back, so only
    one layer's full-precision copy exists at a time and the UNet's own tensors (and any graph that saved
    them) are as they were afterwards. Autocast's cache of cast weights is cleared on both sides."""
    if torch.is_grad_enabled():
        raise RuntimeError("a low-precision frozen copy runs without gradients only")
    modules = dict(unet.named_modules())
    owners: dict[str, list[tuple[str, str]]] = {}
    for name in copy:
        path, _, leaf = name.rpartition(".")
        owners.setdefault(path, []).append((leaf, name))
    saved: dict[str, torch.Tensor] = {}

    def swap_in(path: str):
        def hook(module, args):
            for leaf, name in owners[path]:
                param = getattr(module, leaf)
                saved[name], param.data = param.data, copy[name].to(param.dtype)
        return hook

    def swap_back(path: str):
        def hook(module, args, output):
            for leaf, name in owners[path]:
                getattr(module, leaf).data = saved.pop(name)
        return hook

    handles = [h for path in owners for h in (modules[path].register_forward_pre_hook(swap_in(path)),
                                              modules[path].register_forward_hook(swap_back(path)))]
    torch.clear_autocast_cache()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, data in saved.items():  # a layer that raised: its tensors back too
            path, _, leaf = name.rpartition(".")
            getattr(modules[path], leaf).data = data
        torch.clear_autocast_cache()


# which selection contains which: meta.params must contain the method's own (checked with the config)
CONTAINS = {"full": set(SELECTIONS), "noxattn": {"noxattn", "selfattn"}, "xattn": {"xattn"}, "selfattn": {"selfattn"}}


class Restricted:
    """`objective` with `frozen` kept out of its gradient: the engine turns their requires_grad off around
    the objective's call and its backward pass (both, so that gradient checkpointing recomputes the graph
    the forward built). For a base method's loss when the meta stage trains a wider selection than the
    method's (meta.params)."""

    def __init__(self, objective: Callable, frozen: list[torch.nn.Parameter]):
        self.objective, self.frozen = objective, frozen

    def __call__(self, ctx):
        return self.objective(ctx)


@contextlib.contextmanager
def kept_out(objective: Callable):
    """While an objective computes and backpropagates: a Restricted one's frozen weights need no gradient."""
    frozen = objective.frozen if isinstance(objective, Restricted) else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
