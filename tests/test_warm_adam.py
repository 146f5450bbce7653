"""The simulated attacker of a running Adam (meta.inner_step 'adam_warm'): its
step is torch's Adam update from the moments every simulated attack feeds (of
any form, full or low-rank, once per inner step), its first step is Adam's
first (the 'adam' form), the moments carry across outer steps and checkpoints,
and it is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from metaunlearn.config import MetaConfig
from metaunlearn.engine import StepContext
from metaunlearn.simulated import Attacker, WarmAdam

from helpers import concept_data
from test_meta import BATCH
from test_persistent import make, step
from test_train import assert_same_weights, crash_then_resume, uninterrupted_run, make_config, weights

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
        warm.feed(0, g)
        assert torch.allclose(warm.direction(0, g), before - p.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(warm.direction(0, g), g.sign())  # past the first step: not sign(g)
    # a tensor first fed later has its own count: its first step is Adam's first, sign(g)
    late = torch.tensor([0.3, -2.0])
    warm.feed(1, late)
    assert torch.allclose(warm.direction(1, late), late.sign(), rtol=1e-6)
    # an element an fp16 overflow made non-finite keeps its moments; the others are fed
    m, v = warm.m[1].clone(), warm.v[1].clone()
    warm.feed(1, torch.tensor([float("inf"), 1.0]))
    assert warm.m[1][0] == m[0] and warm.v[1][0] == v[0] and warm.m[1][1] != m[1]
    assert torch.isfinite(warm.direction(1, late)).all()


def test_the_first_warm_step_is_adams_first_then_the_moments_carry(tiny_model):
    data = concept_data(tiny_model)
    warm, first = make(tiny_model, data, inner_step="adam_warm", **ATTACKER), make(tiny_model, data,
                                                                                     inner_step="adam", **ATTACKER)
    a, b = step(warm, 5), step(first, 5)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7) for k in a)
    assert set(warm.warm.t.values()) == {1} and len(warm.warm.m) == len(warm.attacked)
    a, b = step(warm, 6), step(first, 6)
    assert a["meta/forget_before"] == pytest.approx(b["meta/forget_before"], rel=1e-6)  # the same theta
    assert a["meta/forget_after"] != pytest.approx(b["meta/forget_after"], rel=1e-4)  # another step from it


def test_a_step_taken_again_for_the_sharpness_term_feeds_the_moments_once(tiny_model):
    """The sharpness hinge's passes and the inner step it takes again feed nothing: the moments are those of
    the same attack without the hinge."""
    data = concept_data(tiny_model)
    moments = []
    for sharpness in (1.0, 0.0):
        meta = make(tiny_model, data, inner_step="adam_warm", **{**ATTACKER, "inner_steps": (2, 2),
                                                                 "forget_sharpness": sharpness, "sharpness_cap": 0.0})
        theta = [p.detach().clone() for p in meta.attacked]
        logs = step(meta, 3)
        assert ("meta/forget_grad_ratio" in logs) == bool(sharpness)  # the hinge acted: the first step ran twice
        assert set(meta.warm.t.values()) == {2}  # two inner steps, each fed once
        assert all(torch.equal(p, t) for p, t in zip(meta.attacked, theta))
        moments.append([meta.warm.m[i] for i in sorted(meta.warm.m)] + [meta.warm.v[i] for i in sorted(meta.warm.v)])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-12) for a, b in zip(*moments))


@pytest.mark.parametrize("form, low_rank", [("rms", False), ("adam_warm", True)])
def test_every_simulated_step_feeds_the_moments(tiny_model, form, low_rank):
    """An attacker of another form (here one that needs the whole gradient) and a LoRA-like one (whose
    adapter starts afresh: it steps as Adam's first) feed the moments with the full forget gradient."""
    data = concept_data(tiny_model)
    meta = make(tiny_model, data, inner_step=["adam_warm", "rms"], **{**ATTACKER, "low_rank": 0.5})
    ctx = StepContext(0, torch.Generator().manual_seed(4), BATCH)
    a = meta.low_rank.draw(ctx.generator, meta.model.device) if low_rank else None
    forget = meta._batch(meta.data.forget, ctx, meta.inner_batch)
    meta._save(meta.attacked)
    state = ctx.generator.get_state()
    meta._inner_in_place(meta.attacked, forget, Attacker(1e-3, 1, form, low_rank), a, ctx)
    moved = [p.detach() - b for p, b in zip(meta.attacked, meta._backup)]
    meta._restore(meta.attacked)
    ctx.generator.set_state(state)
    grads = torch.autograd.grad(meta._loss(forget, None, ctx), meta.attacked)
    assert set(meta.warm.t.values()) == {1} and len(meta.warm.m) == len(meta.attacked)
    assert all(torch.allclose(meta.warm.m[i], 0.1 * g, rtol=1e-4, atol=1e-10) for i, g in enumerate(grads))
    if low_rank:  # the adapted projections moved, as Adam's first step of the adapter moves them; nothing else
        adapted = [m is not None for m in a]
        assert all((d.abs().sum() > 0) == ad for d, ad in zip(moved, adapted)) and any(adapted)


def test_the_moments_survive_the_state_dict(tiny_model):
    data = concept_data(tiny_model)
    meta = make(tiny_model, data, inner_step="adam_warm", **{**ATTACKER, "inner_lr": (1e-4, 1e-3)})
    step(meta, 1), step(meta, 2)
    state = {k: v.clone() for k, v in meta.state_dict().items()}
    assert int(state["warm.t.0"]) == 2 and any(k.startswith("warm.m.") for k in state)
    expected = step(meta, 3)
    restored = make(tiny_model, data, inner_step="adam_warm", **{**ATTACKER, "inner_lr": (1e-4, 1e-3)})
    restored.load_state_dict(state)
    assert step(restored, 3) == expected
    fresh = make(tiny_model, data, inner_step="adam_warm", **{**ATTACKER, "inner_lr": (1e-4, 1e-3)})
    assert step(fresh, 3) != expected  # so the moments, not the step's own draws, made the difference


def test_a_run_with_a_warm_attacker_resumes_like_an_uninterrupted_one(tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "meta.enabled=true", "method.lr=1e-3", "meta.inner_lr=1e-2",
                         "meta.inner_step=adam_warm", "meta.low_rank=0")
    uninterrupted = uninterrupted_run(config, tiny_pipeline_dir, tmp_path / "a")
    model = crash_then_resume(config, tiny_pipeline_dir, tmp_path / "b")
    assert_same_weights(weights(model.unet), weights(uninterrupted.unet))


@pytest.mark.parametrize("settings", [dict(mode="second_order"), dict(in_place=False)])
def test_a_warm_attacker_off_the_in_place_first_order_route_is_refused(settings):
    with pytest.raises(ValidationError, match="adam_warm"):
        MetaConfig(enabled=True, inner_step=["adam", "adam_warm"], **settings)


def test_a_launch_across_processes_is_refused_before_the_model_loads(tiny_pipeline_dir, monkeypatch):
    from metaunlearn.errors import ConfigError
    from metaunlearn.stages import preflight

    from metaunlearn.config import AttackConfig

    config = make_config(tiny_pipeline_dir, "meta.enabled=true", "meta.inner_step=adam_warm")
    config = config.model_copy(update={"attacks": [AttackConfig(name="full", steps=2, eval_at=[0, 2])]})
    preflight(config)  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each process
    with pytest.raises(ConfigError, match="'adam_warm' runs in one process only"):
        preflight(config, attacks=[])
    preflight(config, unlearns=False, attacks=[])  # evaluating across processes trains no meta stage
    # attacks across processes: each would train on a batch the processes' count times the configured one
    with pytest.raises(ConfigError, match="attacks run in one process"):
        preflight(config, unlearns=False)
