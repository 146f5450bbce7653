"""meta.salient: the Fisher-ratio masks, and post-attack gradients that reach the salient elements only."""

from __future__ import annotations

import pytest
import torch

from metaunlearn.errors import ConfigError
from metaunlearn.params import make_trainable
from metaunlearn.saliency import _top_threshold, fisher, salient_masks

from helpers import concept_data
from test_meta import BATCH, evaluate, objective, subset


def test_the_threshold_keeps_the_asked_fraction_of_all_elements():
    scores = [torch.arange(100.0).reshape(10, 10), torch.arange(100.0, 200.0)]
    threshold = _top_threshold(scores, 0.25)
    assert threshold == 150.0  # the 50 highest of 200 are 150..199
    assert sum(int((s >= threshold).sum()) for s in scores) == 50


def test_masks_rank_by_forget_over_unrelated_fisher(tiny_model, monkeypatch):
    data = concept_data(tiny_model)
    trainable = make_trainable(tiny_model.unet, "noxattn")
    f_forget = fisher(tiny_model, data.forget, trainable, BATCH)
    f_unrelated = fisher(tiny_model, data.unrelated, trainable, BATCH, seed=1)
    assert all(torch.isfinite(f).all() and (f >= 0).all() for f in f_forget + f_unrelated)
    assert sum(float(f.sum()) for f in f_forget) > 0
    masks = salient_masks(tiny_model, data.forget, data.unrelated, trainable, 0.1, BATCH)
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.09 <= kept <= 0.11
    # what the masks keep scores higher, by the ratio, than what they leave
    delta = 1e-3 * float(sum(f.sum() for f in f_unrelated) / sum(f.numel() for f in f_unrelated))
    ratio = torch.cat([(ff / (fu + delta)).flatten() for ff, fu in zip(f_forget, f_unrelated)])
    inside = torch.cat([m.flatten() for m in masks])
    assert ratio[inside].min() >= ratio[~inside].max()


def test_salient_needs_unrelated_concepts(tiny_model):
    data = concept_data(tiny_model)
    trainable = make_trainable(tiny_model.unet, "noxattn")
    with pytest.raises(ConfigError, match="concepts.unrelated"):
        salient_masks(tiny_model, data.forget, None, trainable, 0.5, BATCH)


@pytest.mark.parametrize("mode,in_place,extra", [
    ("first_order", True, {}), ("first_order", False, {}), ("second_order", False, {}),
    ("first_order", True, {"attackers_per_step": 2}), ("first_order", True, {"persistent": 2, "inner_steps": 2}),
    ("second_order", False, {"attacked": "all", "low_rank": 1.0}),
])
def test_the_post_attack_gradients_reach_the_salient_elements_only(tiny_model, mode, in_place, extra):
    """meta.salient on a meta-only objective with no keep terms before the attack: every gradient it leaves
    is a post-attack one (the sharpness hinge's and the unrelated data kept after the attack included), zero
    outside the masks and, inside, the unmasked objective's (same draws)."""
    data = concept_data(tiny_model)
    trainable = subset(tiny_model)
    terms = dict(related_before=0.0, unrelated_before=0.0, mode=mode, in_place=in_place, forget_sharpness=1.0,
                 sharpness_cap=0.0, unrelated_kept=1.0, **extra)
    masks = salient_masks(tiny_model, data.forget, data.unrelated, trainable, 0.3, BATCH)

    def grads(**extra):
        for p in trainable.values():
            p.grad = torch.full_like(p, 0.5)  # an earlier objective's gradient, which the masks leave alone
        out = evaluate(objective(tiny_model, trainable, data, **terms, **extra))
        assert "meta/forget_grad_ratio" in out
        for value in (v for k, v in out.items() if k.startswith("meta_") and torch.is_tensor(v)):
            if value.requires_grad:  # what the engine backpropagates
                value.backward()
        return [p.grad.clone() for p in trainable.values()]

    full, masked = grads(), grads(salient=0.3)
    assert any(bool((f != 0.5)[~m].any()) for f, m in zip(full, masks))  # unmasked: every element moves
    for f, g, m in zip(full, masked, masks):
        assert torch.equal(g[~m], torch.full_like(g[~m], 0.5))
        assert torch.equal(g[m], f[m])


def test_the_keep_terms_before_the_attack_train_every_element(tiny_model):
    """Only the post-attack terms are masked: with the keep terms before the attack on, elements outside the
    masks get their gradient."""
    data = concept_data(tiny_model)
    trainable = subset(tiny_model)
    masks = salient_masks(tiny_model, data.forget, data.unrelated, trainable, 0.3, BATCH)
    for p in trainable.values():
        p.grad = None
    evaluate(objective(tiny_model, trainable, data, in_place=True, salient=0.3, related_before=1.0,
                       unrelated_before=1.0))
    assert all(bool((p.grad[~m] != 0).any()) for p, m in zip(trainable.values(), masks))


def test_all_elements_at_fraction_one_and_a_sampled_threshold(tiny_model, monkeypatch):
    data = concept_data(tiny_model)
    trainable = subset(tiny_model)
    assert all(m.all() for m in salient_masks(tiny_model, data.forget, data.unrelated, trainable, 1.0, BATCH))
    total = sum(p.numel() for p in trainable.values())
    assert total > 2000
    monkeypatch.setattr("metaunlearn.saliency.THRESHOLD_SAMPLE", total // 2)  # the sampled path: about q kept
    masks = salient_masks(tiny_model, data.forget, data.unrelated, trainable, 0.25, BATCH)
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.15 < kept < 0.35


def test_a_study_with_salient_and_no_unrelated_concepts_fails_at_once():
    from metaunlearn.config import StudyConfig

    study = {"concepts": {"forget": {"prompts": ["x"]}}, "meta": {"enabled": True, "salient": 0.2}}
    with pytest.raises(ConfigError, match="concepts.unrelated"):
        StudyConfig.from_dict(study)
    study["concepts"]["unrelated"] = {"prompts": ["y"]}
    assert StudyConfig.from_dict(study).meta.salient == 0.2


def test_the_lora_targets_can_be_held_whole(tiny_model):
    """meta.salient_lora_targets: every element of the projections a LoRA attacker adapts is in the masks."""
    data = concept_data(tiny_model)
    trainable = subset(tiny_model)  # a cross-attention to_k (a LoRA target) and a convolution (not one)
    config = dict(in_place=True, salient=0.1, salient_lora_targets=True)
    masks = objective(tiny_model, trainable, data, **config).salient
    assert masks[0].all() and not masks[1].all()
    assert not objective(tiny_model, trainable, data, in_place=True, salient=0.1).salient[0].all()


def test_a_salient_unlearning_run_trains_and_logs_the_meta_terms(tiny_model, tiny_pipeline_dir, tmp_path):
    """The option through the whole stage (ESD + meta in place): every step finite, the meta terms logged,
    and the trained weights moved everywhere the base method reaches (not only inside the masks)."""
    from test_meta import log_records, make_config, run, weights

    config = make_config(tiny_pipeline_dir, "method.name=esd", "method.steps=2", "meta.salient=0.1")
    original = weights(tiny_model.unet)
    run(config, tiny_model, concept_data(tiny_model), tmp_path / "run")
    records = log_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all("meta/after_objective" in r for r in records)
    moved = sum(int((p.detach() != original[n]).sum()) for n, p in tiny_model.unet.named_parameters())
    trained = sum(p.numel() for n, p in tiny_model.unet.named_parameters() if ".attn2." not in n)
    assert moved > 0.5 * trained  # ESD's loss and the keep terms are not masked: far more than 10% move
