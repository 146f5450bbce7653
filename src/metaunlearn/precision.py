"""Mixed precision for the trained module's forward passes only.

accelerate's `autocast()` around a whole objective also runs the objective's own
arithmetic in fp16/bf16: the simulated attacker's low-rank products, the
sharpness term's finite difference and UCE's anchor were each found rounded
or underflowed there (bench/RESULTS.md, 'A fourth lease'). As diffusers'
training scripts and accelerate's `prepare(model)` do, autocast belongs around
the model's forward pass; everything an objective computes around it stays in
the tensors' own dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch


@contextlib.contextmanager
def forward_autocast(module: torch.nn.Module, autocast: Callable[[], AbstractContextManager],
                     device_type: str) -> Iterator[None]:
    """While inside, every call of `module` (directly, through `torch.func.functional_call`, or with
    weights swapped in) runs under `autocast()`; the code around those calls runs without autocast.

    The surrounding region is itself an autocast context, disabled: autocast's cache of the weights'
    low-precision casts lives until the outermost autocast context exits, so the forward passes of one
    step still share one cast of the weights (and one copy saved for the backward pass), as they did
    when the whole objective ran under autocast."""
    own = module.__dict__.get("forward")  # an instance's own forward (another wrapper); None: the class's
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with autocast():
            return inner(*args, **kwargs)

    module.forward = forward
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
