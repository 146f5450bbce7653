"""method.frozen_dtype: ESD's frozen teacher (and the meta objective's distillation
target) kept in bfloat16/float16 and run layer by layer, each layer's weights cast up
only while it runs. It must equal the original model with its weights rounded, leave
the UNet's own tensors (and graphs built on them) untouched, and halve the copy."""

from __future__ import annotations

import pytest
import torch
from helpers import concept_data

from metaunlearn import DiffusionModel
from metaunlearn.config import MethodConfig
from metaunlearn.engine import StepContext
from metaunlearn.methods import make_method
from metaunlearn.params import LowPrecisionCopy, make_trainable, snapshot


def _perturbed(unet: torch.nn.Module, trainable: dict) -> dict[str, torch.Tensor]:
    """Move the live weights away from the copy, so a missed swap shows; returns the moved values."""
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    return {n: p.detach().clone() for n, p in trainable.items()}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_copy_predicts_as_the_rounded_weights(tiny_pipeline_dir, tmp_path, family, dtype):
    if family == "sdxl":
        from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_sdxl_pipeline

        build_sdxl_pipeline(TinyPipelineConfig(), ["a", "photo", "of", "dog"], seed=0,
                            width_2=48).save_pretrained(tmp_path / "x")  # a second encoder's own width (SDXL: 1280)
        model = DiffusionModel.load(tmp_path / "x")
        assert model.encode_prompts(["a dog"]).hidden.shape[-1] == 32 + 48
    else:
        model = DiffusionModel.load(tiny_pipeline_dir)
    trainable = make_trainable(model.unet, "full")
    copy = snapshot(trainable, dtype)
    assert isinstance(copy, LowPrecisionCopy) and all(t.dtype == getattr(torch, dtype) for t in copy.values())
    # the default keeps tensors as they are: a float16 UNet's copy stays float16, run functionally
    half = snapshot({"w": torch.zeros(2, dtype=torch.float16)})
    assert type(half) is dict and half["w"].dtype == torch.float16 and type(snapshot(trainable)) is dict
    live = _perturbed(model.unet, trainable)
    cond = model.encode_prompts(["a photo of a dog", ""])
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        got = model.predict(x_t, t, cond, copy)
        rounded = model.predict(x_t, t, cond, {n: v.float() for n, v in copy.items()})
        own = model.predict(x_t, t, cond)
    assert torch.equal(got, rounded) and not torch.allclose(got, own, atol=1e-3)
    assert all(torch.equal(p, live[n]) for n, p in trainable.items())  # the UNet's own weights are back
    with pytest.raises(RuntimeError, match="without gradients"):
        model.predict(x_t, t, cond, copy)


def test_esd_with_a_bfloat16_teacher_trains_on_the_rounded_teacher(tiny_model):
    """The student's graph is built before the teacher's layer-by-layer swaps: its backward pass still
    sees the student's weights, and the gradient is the one of a float32 teacher holding the rounded
    weights. The copy takes half the bytes."""
    data = concept_data(tiny_model)
    grads = {}
    for dtype in ("bfloat16", "float32"):
        trainable = make_trainable(tiny_model.unet, "noxattn")
        method = make_method(MethodConfig(name="esd", frozen_dtype=dtype, esd={"x_t": "noised"}), "")
        method.setup(tiny_model, trainable, data)
        if dtype == "float32":  # the same teacher in float32: the bfloat16 one's values
            method.teacher = {n: v.to(torch.bfloat16).float() for n, v in method.teacher.items()}
        else:
            sizes = [v.element_size() for v in method.teacher.values()]
            assert set(sizes) == {2} and method.frozen_original() is method.teacher
        loss = method.loss(StepContext(0, torch.Generator().manual_seed(1), 2)).losses["esd"]
        grads[dtype] = torch.autograd.grad(loss, list(trainable.values()))
    assert all(torch.equal(a, b) for a, b in zip(grads["bfloat16"], grads["float32"]))
