"""Relearning attacks on a tiny pipeline: weights move (LoRA: only the
adapter), curves hold the requested steps, data splits stay disjoint."""

from __future__ import annotations

import pytest
import torch
from helpers import BrightDetector

from metaunlearn import MetaunlearnError
from metaunlearn.attacks import attacker_data, run_attack
from metaunlearn.config import StudyConfig
from metaunlearn.data import ConceptData, RoleData, prepare_concept_data
from metaunlearn.stages import evaluator

PROMPTS = {"forget": ["a photo of the digit eight"], "related": ["the digit three"], "unrelated": ["a dog"]}
assert BrightDetector  # registered as detector 'bright'


def study(**attack) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": {"source": "unused"},
        "concepts": {role: {"prompts": p} for role, p in PROMPTS.items()},
        "evaluation": {"samples_per_prompt": 2, "steps": 2, "batch_size": 8, "concept_rate": {"detector": "bright"}},
        "attacks": [{"name": "a", "steps": 4, "eval_at": [0, 2, 4], "batch_size": 2, "lr": 1e-3, **attack}]})


def attack(config, model, metrics=None, **kwargs) -> dict:
    images = attacker_data(attack_split(model), config.attacks[0])
    return run_attack(config, config.attacks[0], model, images, metrics or evaluator(config), 0, "tiny",
                      progress=False, **kwargs)


def attack_split(model) -> ConceptData:
    def role(name, n=4):
        cond = model.encode_prompts(PROMPTS[name])
        generator = torch.Generator().manual_seed(len(name))
        return RoleData(role=name, latents=torch.randn(n, *model.latent_shape, generator=generator),
                        prompt_index=torch.zeros(n, dtype=torch.long), prompts=PROMPTS[name], cond=cond,
                        sources=[f"test:{name}:{i}" for i in range(n)])

    return ConceptData(forget=role("forget"), related=role("related"), unrelated=role("unrelated"), split="attack")


def test_full_attack_moves_every_weight_and_records_the_curve(tiny_model):
    config = study(kind="full")
    # on the CPU: the attack runs where model.device says (a GPU, when the tests run on one)
    before = {n: p.detach().to("cpu", copy=True) for n, p in tiny_model.unet.named_parameters()}
    metrics, seen = evaluator(config), []
    evaluate = metrics.evaluate

    def spy(model, progress=False):  # the weights each evaluation judged, and what it found
        results, samples = evaluate(model, progress=progress)
        results["values"]["forget_rate"] = len(seen) / 4  # a mark per call: the tiny model's rates barely move
        seen.append(({n: p.detach().to("cpu", copy=True) for n, p in model.unet.named_parameters()}, results["values"]))
        return results, samples

    metrics.evaluate = spy
    curve = attack(config, tiny_model, metrics)
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    assert [s["key"] for s in curve["specs"]] == ["forget_rate", "related_accuracy", "unrelated_accuracy"]
    # each point holds the evaluation of the weights at its step: the released ones, halfway, the attacked ones
    assert [p["values"] for p in curve["points"]] == [values for _, values in seen]
    (at_0, _), (at_2, _), (at_4, _) = seen
    after = {n: p.detach().cpu() for n, p in tiny_model.unet.named_parameters()}
    assert all(torch.equal(at_0[n], before[n]) and torch.equal(at_4[n], after[n]) for n in before)
    assert any(not torch.equal(at_2[n], before[n]) for n in before)
    assert any(not torch.equal(at_2[n], after[n]) for n in before)
    moved = [n for n, p in tiny_model.unet.named_parameters() if not torch.equal(p.cpu(), before[n])]
    assert len(moved) > 0.9 * len(before)
    assert curve["trainable_parameters"] == sum(p.numel() for p in before.values())


def test_lora_attack_trains_only_the_adapter(tiny_model):
    config = study(kind="lora", lora={"rank": 2})
    before = {n: p.detach().to("cpu", copy=True) for n, p in tiny_model.unet.named_parameters()}
    curve = attack(config, tiny_model)
    after = dict(tiny_model.unet.named_parameters())
    lora = [n for n in after if "lora" in n]
    assert lora and curve["trainable_parameters"] == sum(after[n].numel() for n in lora)
    base = {n: p for n, p in after.items() if "lora" not in n}
    # peft wraps the targets (to_q.weight -> to_q.base_layer.weight): compare by value, in order
    assert all(torch.equal(a.cpu(), b) for a, b in zip(base.values(), before.values()))
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in lora if "lora_B" in n)


def test_a_lora_adapter_starts_from_the_attack_seed_whatever_ran_before(tiny_pipeline_dir, monkeypatch):
    """The adapter as the attack creates it, before any step: CUDA's training kernels are not bitwise
    deterministic, so on a GPU only the start can be compared bit for bit; on the CPU the end is too."""
    from metaunlearn import DiffusionModel
    from metaunlearn.attacks.finetune import LoraFinetune

    created = LoraFinetune.trainable
    starts, ends = [], []

    def spy(self, model):
        params = created(self, model)
        starts.append({n: p.detach().to("cpu", copy=True) for n, p in params.items()})
        return params

    monkeypatch.setattr(LoraFinetune, "trainable", spy)
    config = study(kind="lora", lora={"rank": 2}, eval_at=[4])
    for _ in range(2):
        torch.rand(len(ends) + 1)  # other code consuming the global generator in between
        model = DiffusionModel.load(tiny_pipeline_dir)
        attack(config, model)
        ends.append({n: p.detach().cpu() for n, p in model.unet.named_parameters() if "lora" in n})
    assert starts[0].keys() == starts[1].keys() and ends[0].keys() == ends[1].keys()
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in starts[0].values())  # drawn, not zeros
    assert all(torch.equal(starts[0][n], starts[1][n]) for n in starts[0])
    if model.device.type == "cpu":
        assert all(torch.equal(ends[0][n], ends[1][n]) for n in ends[0])


def test_an_attack_uses_its_role_and_the_attack_split_only(tiny_model):
    data = attack_split(tiny_model)
    assert attacker_data(data, study(data="unrelated").attacks[0]) is data.unrelated
    assert attacker_data(data, study(data="related").attacks[0]) is data.related
    assert attacker_data(data, study().attacks[0]) is data.forget
    train = ConceptData(forget=data.forget, related=None, unrelated=None, split="train")
    with pytest.raises(MetaunlearnError, match="held-out 'attack' split"):
        attacker_data(train, study().attacks[0])
    no_benign = ConceptData(forget=data.forget, related=None, unrelated=None, split="attack")
    with pytest.raises(MetaunlearnError, match="concepts.unrelated"):
        attacker_data(no_benign, study(data="unrelated").attacks[0])


def test_attacker_images_are_disjoint_from_unlearning_images(tiny_model, tmp_path):
    config = StudyConfig.from_dict({"model": {"source": "unused"}, "concepts": {"forget": {"prompts": ["a dog"]}},
                                    "data": {"images_per_prompt": 2, "generation_steps": 2}})
    train = prepare_concept_data(config, tiny_model, "train", tmp_path, progress=False, log=lambda *_: None)
    attack = prepare_concept_data(config, tiny_model, "attack", tmp_path, progress=False, log=lambda *_: None)
    assert not set(train.forget.sources) & set(attack.forget.sources)
    assert not any(torch.allclose(a, b) for a in attack.forget.latents for b in train.forget.latents)


@pytest.mark.parametrize("attack_, message", [
    ({"kind": "lora", "lora": {"targets": ["no_such_module"]}}, "match no UNet module|bad lora.targets"),
])
def test_bad_lora_targets_fail_clearly(tiny_model, attack_, message):
    with pytest.raises(MetaunlearnError, match=message):
        attack(study(**attack_), tiny_model)


@pytest.mark.parametrize("attack_, message", [
    ({"kind": "qlora"}, "attacks.0.kind"),
    ({"eval_at": [0, 500]}, "outside 0..steps"),
    ({"eval_at": []}, "attacks.0.eval_at is empty"),
    ({"lr": -1}, "attacks.0.lr"),
    ({"data": "benign"}, "attacks.0.data"),
])
def test_bad_attack_config_fails_with_its_key(attack_, message):
    from metaunlearn.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        study(**attack_)


def test_a_saved_lora_adapter_loads_at_the_strength_it_was_trained_with(tiny_pipeline_dir, tmp_path):
    """alpha != rank: a loader that finds no alpha in the file takes alpha = rank."""
    from test_export import _unet_out

    from metaunlearn import DiffusionModel
    from metaunlearn.attacks import make_attack

    config = study(kind="lora", lora={"rank": 2, "alpha": 8})
    model, lora = DiffusionModel.load(tiny_pipeline_dir), make_attack(config.attacks[0])
    lora.trainable(model)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    attacked = _unet_out(model)
    lora.save(model, tmp_path)
    loaded = DiffusionModel.load(tiny_pipeline_dir)
    loaded.pipe.load_lora_weights(tmp_path / "lora")
    assert not torch.allclose(attacked, _unet_out(DiffusionModel.load(tiny_pipeline_dir)), atol=1e-4)
    torch.testing.assert_close(_unet_out(loaded), attacked, rtol=1e-4, atol=1e-5)
