"""The simulated attacker of the meta objective: draws inside its family, the
low-rank (LoRA-like) update, trajectory weights; and the terms that keep
concepts intact (distillation to the original, unrelated kept after the attack)."""

from __future__ import annotations

import math

import pytest
import torch

from metaunlearn.config import MetaConfig
from metaunlearn.simulated import LowRank, draw, inner_direction, trajectory_weights

from helpers import concept_data
from test_meta import BATCH, double_model, evaluate, objective, subset  # noqa: F401


def test_a_fixed_attacker_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    attacker = draw(MetaConfig(inner_lr=3e-4, inner_steps=2, inner_step="adam", low_rank=0.0), generator)
    assert (attacker.lr, attacker.steps, attacker.form, attacker.low_rank) == (3e-4, 2, "adam", False)
    assert torch.equal(generator.get_state(), state)  # the step's randomness is left as it was


def test_a_family_draws_inside_its_ranges_and_covers_them():
    config = MetaConfig(inner_lr=(1e-5, 1e-3), inner_steps=(1, 3), inner_step=["sgd", "adam"], low_rank=0.5)
    generator = torch.Generator().manual_seed(1)
    drawn = [draw(config, generator) for _ in range(400)]
    assert all(1e-5 <= a.lr <= 1e-3 for a in drawn)
    logs = [math.log10(a.lr) for a in drawn]
    assert min(logs) < -4.7 and max(logs) > -3.3 and abs(sum(logs) / len(logs) + 4) < 0.15  # log-uniform
    assert {a.steps for a in drawn} == {1, 2, 3} and {a.form for a in drawn} == {"sgd", "adam"}
    assert 0.4 < sum(a.low_rank for a in drawn) / len(drawn) < 0.6


def test_a_low_rank_attacker_draws_its_lr_from_its_own_range():
    config = MetaConfig(inner_lr=(1e-5, 1e-4), low_rank_lr=(1e-3, 1e-2), low_rank=0.5)
    drawn = [draw(config, torch.Generator().manual_seed(seed)) for seed in range(200)]
    assert all((1e-3 <= a.lr <= 1e-2) if a.low_rank else (1e-5 <= a.lr <= 1e-4) for a in drawn)
    assert 50 < sum(a.low_rank for a in drawn) < 150
    fixed = draw(MetaConfig(inner_lr=1e-4, low_rank_lr=(1e-3, 1e-2), low_rank=1.0), torch.Generator().manual_seed(0))
    assert 1e-3 <= fixed.lr <= 1e-2
    # unset, the draws are those of before the option existed
    same = MetaConfig(inner_lr=(1e-5, 1e-3), low_rank=0.5)
    assert [draw(same, torch.Generator().manual_seed(s)).lr for s in range(5)] == \
        [draw(same.model_copy(update={"low_rank_lr": (1e-5, 1e-3)}), torch.Generator().manual_seed(s)).lr
         for s in range(5)]


def test_trajectory_weights():
    assert trajectory_weights(3, "last") == [0.0, 0.0, 1.0]
    assert trajectory_weights(3, "linear") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert trajectory_weights(1, "linear") == [1.0]


def test_the_low_rank_update_has_rank_r_and_touches_attention_projections_only():
    names = ["blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_out.0.weight", "blocks.0.attn1.to_out.0.bias",
             "blocks.0.conv1.weight"]
    shapes = [(8, 6), (8, 8), (8,), (8, 4, 3, 3)]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=g) for s in shapes]
    low = LowRank(names, [torch.zeros(s) for s in shapes], rank=2)
    assert low.targets == [True, True, False, False]
    a = low.draw(torch.Generator().manual_seed(3), "cpu")
    assert a[0].shape == (2, 6) and a[1].shape == (2, 8) and a[2] is None and a[3] is None
    for form in ("sgd", "adam", "normalized", "rms"):
        step = low.direction(grads, form, a)
        assert [d.shape for d in step] == [torch.Size(s) for s in shapes]
        assert all(torch.linalg.matrix_rank(d) == 2 for d in step[:2])
        assert all(not d.any() for d in step[2:])
    # sgd: exactly what a LoRA adapter's B-gradient step makes of W: (G A^T) A
    torch.testing.assert_close(low.direction(grads, "sgd", a)[0], grads[0] @ a[0].T @ a[0])
    adam = low.direction(grads, "adam", a)[1]
    torch.testing.assert_close(adam, inner_direction([grads[1] @ a[1].T], "adam")[0] @ a[1])


@pytest.mark.parametrize("form", ["sgd", "adam", "normalized", "rms"])
def test_low_rank_directions_ignore_a_callers_fp16_autocast(form):
    # the simulated attacks ran inside the engine's autocast (now the UNet's forward passes only): G A^T
    # came out in fp16, an unscaled gradient's small entries underflowed, and Adam's 0 / (0 + eps) was NaN
    # at every fp16 step (SD-1.4 on an H100)
    names, shape = ["blocks.0.attn1.to_q.weight"], (16, 12)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 1e-9
    grad[0] = 1e-3  # one row large enough for fp16, the rest not
    low = LowRank(names, [torch.zeros(shape)], rank=2)
    a = low.draw(torch.Generator().manual_seed(5), "cpu")
    exact = low.direction([grad], form, a)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        whole, one = low.direction([grad], form, a)[0], LowRank.direction_of(grad, form, a[0])
    assert whole.dtype == one.dtype == torch.float32
    assert torch.equal(whole, exact)
    if form not in ("normalized", "rms"):  # these act on the whole gradient's norm, not one tensor's
        assert torch.equal(one, exact)


def test_distillation_keeps_roles_at_the_original_and_is_zero_there(tiny_model):
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    meta = objective(tiny_model, trainable, data, retain="distill", forget_after=0.0, related_after=0.0)
    out = evaluate(meta)
    # theta is the original: its predictions match the original's exactly
    assert out["meta_related_before"].item() == 0.0 and out["meta_unrelated_before"].item() == 0.0
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    moved = evaluate(meta)
    assert moved["meta_related_before"].item() > 0
    grads = torch.autograd.grad(moved["meta_related_before"], list(trainable.values()))
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["first_order", "second_order"])
def test_unrelated_kept_is_a_post_attack_term_that_pulls_toward_the_original(tiny_model, mode):
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    only_kept = dict(forget_after=0.0, related_after=0.0, related_before=0.0, unrelated_before=0.0)
    meta = objective(tiny_model, trainable, data, mode=mode, retain="distill", unrelated_kept=1.0, inner_lr=0.5,
                     **only_kept)
    out = evaluate(meta)
    assert out["meta/unrelated_kept"] > 0 and set(out) >= {"meta_after", "meta/after_objective"}
    assert out["meta/after_objective"] == pytest.approx(out["meta/unrelated_kept"], rel=1e-6)
    grads = torch.autograd.grad(out["meta_after"], list(trainable.values()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "meta_after" not in evaluate(objective(tiny_model, trainable, data, **only_kept))


def test_a_linear_trajectory_weights_every_inner_step(tiny_model, monkeypatch):
    """First order: the collected gradient (and the objective) is the weighted sum of each point's. Each
    point alone is one weight ~1 and the other ~0, not 0: a zero-weight point is skipped, which would
    change the batches drawn after it."""
    import metaunlearn.meta as meta_module

    data, trainable = concept_data(tiny_model), subset(tiny_model)
    args = dict(mode="first_order", inner_steps=2, inner_lr=0.5, related_before=0.0, unrelated_before=0.0,
                trajectory="linear")

    def run(weights):
        monkeypatch.setattr(meta_module, "trajectory_weights", lambda steps, how: weights)
        out = evaluate(objective(tiny_model, trainable, data, **args))
        assert out["meta/inner_steps"] == 2.0
        return out["meta/after_objective"], torch.autograd.grad(out["meta_after"], list(trainable.values()))

    (first, g1), (second, g2) = run([1.0, 1e-12]), run([1e-12, 1.0])
    w = trajectory_weights(2, "linear")
    both, g = run(w)
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2))  # the two points' gradients differ
    assert both == pytest.approx(w[0] * first + w[1] * second, rel=1e-5)
    for got, a, b in zip(g, g1, g2):
        torch.testing.assert_close(got, w[0] * a + w[1] * b, rtol=1e-4, atol=1e-8)


def test_sharpness_is_the_gradient_of_the_squared_forget_gradient_norm(double_model):  # noqa: F811
    """The finite-difference term against autograd's double backward, in float64, at the default step and a
    smaller one (meta.fd_step): in float64 the error is the difference's truncation, so it shrinks with it."""
    model = double_model
    model.use_math_attention()  # the exact reference below needs a double backward
    data, trainable = concept_data(model), subset(model)
    none = dict(forget_after=0.0, related_after=0.0, related_before=0.0, unrelated_before=0.0)
    errors = []
    for fd_step in (1e-4, 1e-5):
        meta = objective(model, trainable, data, forget_sharpness=0.5, sharpness_cap=0.0, fd_step=fd_step, **none)
        out = evaluate(meta, seed=5)
        assert out["meta_sharpness"].item() == 0.0 and out["meta/forget_grad_ratio"] == pytest.approx(1.0, rel=0.3)
        got = torch.autograd.grad(out["meta_sharpness"], list(trainable.values()))

        # by hand: the same forget batch, t and noise; ||g||^2 differentiated exactly
        gen = torch.Generator().manual_seed(5)
        forget = data.forget.sample(BATCH, gen)
        loss = model.denoising_loss(*forget, params=dict(trainable), generator=gen)
        g = torch.autograd.grad(loss, list(trainable.values()), create_graph=True)
        exact = torch.autograd.grad(0.5 * sum((x ** 2).sum() for x in g) / meta.grad_reference ** 2,
                                    list(trainable.values()))
        errors.append(math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(got, exact))) /
                      math.sqrt(sum((b ** 2).sum().item() for b in exact)))
    assert errors[0] < 0.05 and errors[1] < errors[0] / 3, errors
    # and the rest of the step draws what it would have without the term
    plain = evaluate(objective(model, trainable, data, **{**none, "related_before": 1.0}), seed=5)
    with_term = evaluate(objective(model, trainable, data, forget_sharpness=0.5, sharpness_cap=0.0,
                                   **{**none, "related_before": 1.0}),
                         seed=5)
    assert with_term["meta_related_before"].item() == plain["meta_related_before"].item()
