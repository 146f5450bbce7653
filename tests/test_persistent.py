"""The persistent simulated attacker (meta.persistent): each outer step of an
episode continues the attack from where the last left it, the episode ends
after R steps, in place equals functional, and a run resumes mid-episode like
an uninterrupted one."""

from __future__ import annotations

import re

import pytest
import torch

from metaunlearn import DiffusionModel
from metaunlearn.config import MetaConfig, MethodConfig
from metaunlearn.engine import StepContext
from metaunlearn.layout import unlearn_fingerprint
from metaunlearn.meta import MetaObjective, make_meta
from metaunlearn.methods import make_method
from metaunlearn.params import make_trainable
from metaunlearn.unlearn import unlearn

from helpers import concept_data
from test_meta import BATCH
from test_train import assert_same_weights, crash_then_resume, uninterrupted_run, log_records, make_config, weights

# a fixed attacker (nothing drawn: the generator's draws are the same with and without an episode)
FIXED = dict(inner_lr=1e-2, inner_steps=1, inner_step="sgd", low_rank=0.0, forget_sharpness=0.0)


def make(model, data, **meta) -> MetaObjective:
    trainable = make_trainable(model.unet, "noxattn")
    method = make_method(MethodConfig(name="esd", esd={"x_t": "noised"}), "")
    method.setup(model, trainable, data)
    return make_meta(MetaConfig(enabled=True, **meta), model, trainable, data, method, BATCH)


def step(meta: MetaObjective, seed: int) -> dict:
    for p in meta.trainable.values():
        p.grad = None
    terms = meta(StepContext(0, torch.Generator().manual_seed(seed), BATCH))
    return {**{k: v.item() for k, v in terms.losses.items() if k not in ("meta_after", "meta_sharpness")}, **terms.logs}


def test_an_episode_continues_the_attack_and_ends_after_its_length(tiny_model):
    data = concept_data(tiny_model)
    meta = make(tiny_model, data, persistent=3, **FIXED)
    fresh = make(tiny_model, data, **FIXED)
    theta = [p.detach().clone() for p in meta.attacked]

    first = step(meta, 7)
    assert first["meta/attack_depth"] == 1.0 and first == {**step(fresh, 7), "meta/attack_depth": 1.0}
    delta = [d.clone() for d in meta.episode.delta]
    assert any(d.abs().sum() > 0 for d in delta)

    # the second step attacks from theta + delta: what a fresh attacker sees with the weights moved there
    second = step(meta, 8)
    with torch.no_grad():
        for p, d in zip(fresh.attacked, delta):
            p.add_(d)
    moved = step(fresh, 8)
    assert second["meta/forget_before"] == pytest.approx(moved["meta/forget_before"], rel=1e-5)
    assert second["meta/forget_after"] == pytest.approx(moved["meta/forget_after"], rel=1e-5)
    assert second["meta/forget_before"] != pytest.approx(first["meta/forget_before"], rel=1e-3)
    with torch.no_grad():
        for p, t in zip(fresh.attacked, theta):
            p.copy_(t)
    # the displacement grows by the second step's own: the attack is two steps deep
    assert sum((d2 - d1).abs().sum() for d2, d1 in zip(meta.episode.delta, delta)) > 0
    assert all(torch.equal(p, t) for p, t in zip(meta.attacked, theta))  # theta itself never moved

    assert step(meta, 9)["meta/attack_depth"] == 3.0 and meta.episode.depth == 0  # the episode is over
    again = step(meta, 7)
    assert again == first  # a new episode starts at theta


@pytest.mark.parametrize("attacker", [dict(inner_step="adam", low_rank=1.0, sharpness_cap=0.0),
                                      dict(inner_step="sgd", low_rank=0.0, inner_lr=1e-2)])
def test_in_place_and_functional_episodes_agree(tiny_model, attacker):
    data = concept_data(tiny_model)
    runs = []
    for in_place in (False, True):
        meta = make(tiny_model, data, persistent=4, in_place=in_place, inner_steps=(2, 2), **attacker)
        logs = [step(meta, seed) for seed in (3, 4, 5)]
        runs.append((logs, [d.clone() for d in meta.episode.delta]))
    (logs_f, delta_f), (logs_i, delta_i) = runs
    assert [x["meta/attack_depth"] for x in logs_f] == [1.0, 2.0, 3.0]
    for a, b in zip(logs_f, logs_i):
        bad = {k: (a[k], b[k]) for k in a if a[k] != pytest.approx(b[k], rel=1e-4, abs=1e-7)}
        assert a.keys() == b.keys() and not bad
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(delta_f, delta_i))


def test_an_episode_survives_its_state_dict(tiny_model):
    data = concept_data(tiny_model)
    meta = make(tiny_model, data, persistent=3, **{**FIXED, "low_rank": 1.0, "inner_lr": (1e-3, 1e-2)})
    step(meta, 1)
    state = {k: v.clone() for k, v in meta.state_dict().items()}
    assert int(state["depth"]) == 1 and any(k.startswith("a.") for k in state)
    expected = step(meta, 2)
    restored = make(tiny_model, data, persistent=3, **{**FIXED, "low_rank": 1.0, "inner_lr": (1e-3, 1e-2)})
    restored.load_state_dict(state)
    assert step(restored, 2) == expected
    assert make(tiny_model, data, **FIXED).state_dict() == {}


def test_a_run_resumes_mid_episode_like_an_uninterrupted_one(tiny_pipeline_dir, tmp_path):
    # checkpoints at steps 2 and 4; with episodes of 3 the resume at 4 is one step into an episode
    config = make_config(tiny_pipeline_dir, "meta.enabled=true", "meta.persistent=3", "method.lr=1e-3",
                         "meta.inner_lr=0.05", "meta.inner_step=sgd", "meta.low_rank=0")
    uninterrupted = uninterrupted_run(config, tiny_pipeline_dir, tmp_path / "a")
    depths = [r.get("meta/attack_depth") for r in log_records(tmp_path / "a")]
    assert depths == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0]
    model = crash_then_resume(config, tiny_pipeline_dir, tmp_path / "b")
    assert [r["step"] for r in log_records(tmp_path / "b")] == list(range(1, 9))
    assert_same_weights(weights(model.unet), weights(uninterrupted.unet))


@pytest.mark.parametrize("mode, in_place", [("first_order", True), ("first_order", False), ("second_order", False)])
def test_the_simulated_attacker_also_moves_the_weights_the_defence_leaves_frozen(tiny_model, mode, in_place):
    """attacked 'all': ESD-u trains no cross-attention, but the simulated attacker moves it (as a real
    finetuner does); the frozen weights come back untouched, with no gradient, and only the trained ones
    get the meta gradient, which differs from an attacker that moves the trained weights only."""
    data = concept_data(tiny_model)
    # ESD-u's noxattn leaves cross-attention, the time embedding and the output layers frozen
    trained = set(make_trainable(tiny_model.unet, "noxattn"))
    frozen = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters() if n not in trained}
    assert any(".attn2." in n for n in frozen)
    grads = {}
    for attacked in ("all", "trained"):
        meta = make(tiny_model, data, persistent=2, attacked=attacked, mode=mode, in_place=in_place,
                    **{**FIXED, "inner_step": "adam"})
        n = meta.n_trained
        assert not any(".attn2." in name for name in meta.names)
        assert set(meta.attacked_names[n:]) == (set(frozen) if attacked == "all" else set())
        for p in meta.trainable.values():
            p.grad = None
        terms = meta(StepContext(0, torch.Generator().manual_seed(3), BATCH))
        for p in meta.trainable.values():  # what the engine does with the terms it gets
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        total = sum(v for v in terms.losses.values() if v.requires_grad)
        if torch.is_tensor(total) and total.requires_grad:
            total.backward(inputs=list(meta.trainable.values()))
        grads[attacked] = [p.grad.clone() for p in meta.trainable.values()]
        moved = meta.episode.delta[n:]
        assert len(moved) == len(meta.attacked_names[n:]) and all(d.abs().sum() > 0 for d in moved)
        for name, p in tiny_model.unet.named_parameters():
            if name in frozen:
                assert torch.equal(p, frozen[name]) and p.grad is None and not p.requires_grad
    assert all(torch.isfinite(g).all() for g in grads["all"])
    assert any(not torch.allclose(a, b) for a, b in zip(grads["all"], grads["trained"]))


@pytest.mark.parametrize("setting, refusal", [
    ("meta.persistent=3", "meta.persistent runs in one process only"),
    ("meta.inner_step=[sgd, adam_warm]", "'adam_warm' runs in one process only")])
def test_per_process_meta_state_across_processes_is_refused_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                            setting, refusal):
    """A persistent attacker's episode and a running Adam's moments are each process's own, and a checkpoint
    holds the main process's only."""
    import types

    import metaunlearn.unlearn as unlearn_module
    from metaunlearn.errors import ConfigError

    config = make_config(tiny_pipeline_dir, "meta.enabled=true", setting)
    model = DiffusionModel.load(tiny_pipeline_dir)
    monkeypatch.setattr(unlearn_module, "make_accelerator", lambda *a: types.SimpleNamespace(num_processes=2))
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        unlearn(config, model, concept_data(model), tmp_path / "run", 0, unlearn_fingerprint(config, 0),
                progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "run.json").exists()


def test_an_episode_whose_attack_overflowed_ends():
    """Under fp16 a simulated attack can overflow (the scaler then skips the step): its displacement must not
    start the episode's later steps, nor go into a checkpoint."""
    from metaunlearn.simulated import Episode

    theta = [torch.zeros(3), torch.ones(2)]
    episode = Episode(5)
    episode.advance(theta, [torch.full((3,), 0.5), torch.ones(2)])
    assert episode.depth == 1 and torch.equal(episode.offset[0], torch.full((3,), 0.5))
    episode.advance(theta, [torch.tensor([0.0, float("inf"), 0.0]), torch.ones(2)])
    assert episode.depth == 0 and episode.offset is None and episode.state_dict() == {"depth": torch.tensor(0)}
