"""The simulated attacker of a running Adam (meta.inner_step 'adam_warm'): its
step is torch's Adam update from the moments every simulated attack feeds, its
first step is Adam's first (the 'adam' form), the moments carry across outer
steps and checkpoints, and it is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from metaunlearn import DiffusionModel
from metaunlearn.config import MetaConfig
from metaunlearn.layout import unlearn_fingerprint
from metaunlearn.simulated import WarmAdam
from metaunlearn.unlearn import unlearn

from helpers import concept_data
from test_persistent import make, step
from test_train import assert_same_weights, crash_then_resume, make_config, weights

ATTACKER = dict(inner_lr=1e-3, inner_steps=1, low_rank=0.0, forget_sharpness=0.0)


def test_the_warm_step_is_torch_adams_update():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=gen) * (k + 1) for k in range(4)]
    p = torch.zeros(5, 3, requires_grad=True)
    adam = torch.optim.Adam([p], lr=1.0)  # betas and eps: torch's defaults, which AdamW finetuners keep
    warm = WarmAdam()
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        adam.step()
        warm.tick()
        warm.feed(0, g)
        assert torch.allclose(warm.direction(0, g), before - p.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(warm.direction(0, g), g.sign())  # past the first step: not sign(g)
    warm.feed(1, torch.full((2,), float("inf")))  # an fp16 overflow feeds nothing and moves nothing
    assert 1 not in warm.m and torch.equal(warm.direction(1, torch.ones(2)), torch.zeros(2))


def test_the_first_warm_step_is_adams_first_then_the_moments_carry(tiny_model):
    data = concept_data(tiny_model)
    warm, first = make(tiny_model, data, inner_step="adam_warm", **ATTACKER), make(tiny_model, data,
                                                                                     inner_step="adam", **ATTACKER)
    a, b = step(warm, 5), step(first, 5)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7) for k in a)
    assert warm.warm.t == 1 and len(warm.warm.m) == len(warm.attacked)
    a, b = step(warm, 6), step(first, 6)
    assert a["meta/forget_before"] == pytest.approx(b["meta/forget_before"], rel=1e-6)  # the same theta
    assert a["meta/forget_after"] != pytest.approx(b["meta/forget_after"], rel=1e-4)  # another step from it


def test_a_step_taken_again_for_the_sharpness_term_feeds_the_moments_once(tiny_model):
    data = concept_data(tiny_model)
    meta = make(tiny_model, data, inner_step="adam_warm", **{**ATTACKER, "inner_steps": (2, 2),
                                                             "forget_sharpness": 1.0, "sharpness_cap": 0.0})
    theta = [p.detach().clone() for p in meta.attacked]
    logs = step(meta, 3)
    assert "meta/forget_grad_ratio" in logs  # the hinge acted, so the first inner step ran twice
    assert meta.warm.t == 2  # two inner steps, each fed once
    assert all(torch.equal(p, t) for p, t in zip(meta.attacked, theta))


def test_the_moments_survive_the_state_dict(tiny_model):
    data = concept_data(tiny_model)
    meta = make(tiny_model, data, inner_step=["sgd", "adam_warm"], **{**ATTACKER, "inner_lr": (1e-4, 1e-3)})
    step(meta, 1), step(meta, 2)
    state = {k: v.clone() for k, v in meta.state_dict().items()}
    assert int(state["warm.t"]) == 2 and any(k.startswith("warm.m.") for k in state)
    expected = step(meta, 3)
    restored = make(tiny_model, data, inner_step=["sgd", "adam_warm"], **{**ATTACKER, "inner_lr": (1e-4, 1e-3)})
    restored.load_state_dict(state)
    assert step(restored, 3) == expected


def test_a_run_with_a_warm_attacker_resumes_like_an_uninterrupted_one(tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "meta.enabled=true", "method.lr=1e-3", "meta.inner_lr=1e-2",
                         "meta.inner_step=adam_warm", "meta.low_rank=0")
    uninterrupted = DiffusionModel.load(tiny_pipeline_dir)
    unlearn(config, uninterrupted, concept_data(uninterrupted), tmp_path / "a", 0, unlearn_fingerprint(config, 0),
            progress=False)
    model = crash_then_resume(config, tiny_pipeline_dir, tmp_path / "b")
    assert_same_weights(weights(model.unet), weights(uninterrupted.unet))


@pytest.mark.parametrize("settings", [dict(mode="second_order"), dict(in_place=False)])
def test_a_warm_attacker_off_the_in_place_first_order_route_is_refused(settings):
    with pytest.raises(ValidationError, match="adam_warm"):
        MetaConfig(enabled=True, inner_step=["adam", "adam_warm"], **settings)
