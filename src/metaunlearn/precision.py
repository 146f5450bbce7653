"""Mixed precision for the trained module's forward passes only.

accelerate's `autocast()` around a whole objective also runs the objective's own
arithmetic in fp16/bf16: the simulated attacker's low-rank products and UCE's
anchor were each found underflowed or rounded there (bench/RESULTS.md, 'A fourth
lease'). As diffusers' training scripts do, autocast belongs around the model's
forward pass; everything an objective computes around it stays in the tensors'
own dtype. Unlike accelerate's `prepare(model)` the outputs are not cast back to
float32: a UNet output stays fp16/bf16, and every loss takes `.float()` of it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch


@contextlib.contextmanager
def forward_autocast(module: torch.nn.Module, autocast: Callable[[], AbstractContextManager] | None,
                     device_type: str) -> Iterator[None]:
    """While inside, every call of `module` (directly, through `torch.func.functional_call`, or with
    weights swapped in) runs under `autocast()`; the code around those calls runs without autocast.
    `autocast` None (no mixed precision): nothing changes.

    The surrounding region is itself an autocast context, disabled: autocast's cache of the weights'
    low-precision casts lives until the outermost autocast context exits, so the forward passes of one
    step still share one cast of the weights (and one copy saved for the backward pass), as they did
    when the whole objective ran under autocast. Hence the cache is cleared wherever weights move in
    place between forward passes (meta.py, params.py)."""
    if autocast is None:
        yield
        return
    own = module.__dict__.get("forward")  # an instance's own forward (another wrapper); None: the class's
    call = type(module).forward if own is None else (lambda _, *args, **kwargs: own(*args, **kwargs))

    def forward(self, *args, **kwargs):
        with autocast():
            return call(self, *args, **kwargs)

    # bound to the module, so a copy made meanwhile (copy.deepcopy rebinds methods) runs its own weights
    module.forward = types.MethodType(forward, module)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
