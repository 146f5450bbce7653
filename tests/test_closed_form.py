"""The closed-form methods: UCE's solution against a least-squares solve, what
it edits and what it leaves, the SDXL text width, RECE's adversarial
embeddings against a direct minimisation, the meta stage's routes, and a
closed-form run that checkpoints and resumes like any other."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metaunlearn import DiffusionModel
from metaunlearn.engine import Terms
from metaunlearn.layout import unlearn_fingerprint
from metaunlearn.methods import make_method
from metaunlearn.methods.rece import adversarial_keys
from metaunlearn.methods.uce import aligned_keys, projections, solve
from metaunlearn.unlearn import unlearn

from helpers import concept_data
from test_train import assert_same_weights, crash_then_resume, uninterrupted_run, log_records, make_config, weights


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_closed_form_is_the_least_squares_solution():
    w, ce, ve, cp = rand(5, 4, seed=1), rand(3, 4, seed=2), rand(3, 5, seed=3), rand(6, 4, seed=4)
    lam, se, sp = 0.5, 2.0, 0.7
    got = solve(w, ce, ve, cp, lam, se, sp)
    # minimise lam ||X - W||^2 + se ||X ce^T - ve^T||^2 + sp ||X cp^T - W cp^T||^2 as one stacked system
    a = torch.cat([lam ** 0.5 * torch.eye(4, dtype=torch.float64), se ** 0.5 * ce, sp ** 0.5 * cp])
    y = torch.cat([lam ** 0.5 * w.T, se ** 0.5 * ve, sp ** 0.5 * (cp @ w.T)])
    expected = torch.linalg.lstsq(a, y).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert solve(w.float(), ce, ve, cp, lam, se, sp).dtype == torch.float32  # solved in float64, stored as given


def test_keys_from_the_last_content_token_on_or_every_token():
    hidden, guide = rand(2, 6, 3, seed=5), rand(6, 3, seed=6)
    keys, guides = aligned_keys(hidden, [4, 5], guide, 3, "last")
    # prompt 0: last content token at 2, guide at 1 -> 6 - 2 = 4 tokens each; prompt 1: at 3 -> 3 tokens
    assert keys.shape == (7, 3) and guides.shape == (7, 3)
    for got, expected in ((keys[:4], hidden[0, 2:6]), (guides[:4], guide[1:5]), (keys[4:], hidden[1, 3:6]),
                          (guides[4:], guide[1:4])):
        assert torch.equal(got, expected)
    every, paired = aligned_keys(hidden, [4, 5], guide, 3, "every")
    assert torch.equal(every, hidden.flatten(0, 1)) and torch.equal(paired, torch.cat([guide, guide]))


def edited(tiny_model, **options):
    config = make_config("unused", "method.name=uce", *[f"method.uce.{k}={v}" for k, v in options.items()])
    method = make_method(config.method, "the digit three")
    before = weights(tiny_model.unet)
    data = concept_data(tiny_model)
    method.edit(tiny_model, data)
    return method, before, data


def test_uce_edits_cross_attention_keys_and_values_only_and_moves_the_forget_outputs_to_the_guide(tiny_model):
    method, before, data = edited(tiny_model, erase_scale=1000, preserve_scale=0.001)
    after = weights(tiny_model.unet)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(projections(tiny_model.unet)) and changed
    keys = method.solved_keys
    for name in projections(tiny_model.unet):
        old_out, target = keys["erase"] @ before[name].T, keys["guide"] @ before[name].T
        new_out = keys["erase"] @ after[name].T
        assert (new_out - target).norm() < 0.02 * (old_out - target).norm(), name


def test_the_preserved_outputs_stay_and_sdxl_text_widths_solve():
    from diffusers import UNet2DConditionModel

    # SDXL's UNet sees both encoders' hidden states side by side (768 + 1280 there; 32 + 64 here)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=96, attention_head_dim=8, norm_num_groups=8)
    layers = projections(unet)
    assert layers and all(m.weight.shape[1] == 96 for m in layers.values())
    erase, guide, preserve = rand(4, 96, seed=7).float(), rand(4, 96, seed=8).float(), rand(40, 96, seed=9).float()
    for module in layers.values():
        w = module.weight.detach()
        new = solve(w, erase, guide @ w.T, preserve, 0.5, 1.0, 100.0)
        assert new.shape == w.shape
        kept = (preserve @ new.T - preserve @ w.T).norm() / (preserve @ w.T).norm()
        assert kept < 0.05


def test_rece_adversarial_embedding_is_the_minimiser():
    edited_ = [rand(5, 4, seed=10), rand(3, 4, seed=11)]
    original = [rand(5, 4, seed=12), rand(3, 4, seed=13)]
    c, gamma = rand(2, 4, seed=14), 0.3
    got = adversarial_keys(edited_, original, c, gamma)
    # gradient descent on sum_l ||W'_l c' - W_l c||^2 + gamma ||c'||^2, from zero
    x = torch.zeros_like(c, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = sum(((x @ wn.T - c @ wo.T) ** 2).sum() for wn, wo in zip(edited_, original)) + gamma * (x ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(got, x.detach(), rtol=1e-6, atol=1e-8)


def test_rece_keeps_the_round_its_judge_likes_best(tiny_model):
    config = make_config("unused", "method.name=rece", "method.rece.rounds=2")
    method = make_method(config.method, "")
    verdicts = iter([0.5, 0.2, 0.4])  # round 0 (UCE), 1, 2
    method.edit(tiny_model, concept_data(tiny_model), judge=lambda: next(verdicts))
    assert method.history == [0.5, 0.2, 0.4] and method.best_round == 1
    n = len(method.solved_keys["guide"])
    assert len(method.solved_keys["erase"]) == n and n % 2 == 0  # round 1: the base keys and one set of c'
    # every round at 0%: the later round, which erased more regenerating embeddings, wins the tie
    tied = make_method(config.method, "")
    tied.edit(tiny_model, concept_data(tiny_model), judge=lambda: 0.0)
    assert tied.history == [0.0, 0.0, 0.0] and tied.best_round == 2
    assert len(tied.solved_keys["erase"]) == 3 * len(method.solved_keys["erase"]) // 2


@pytest.mark.parametrize("route", ["paper", "anchor", "reapply"])
def test_the_meta_stage_after_an_edit(tiny_model, tiny_pipeline_dir, tmp_path, route):
    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.params=full", f"method.uce.meta_route={route}",
                         "method.steps=2", "meta.enabled=true")
    out = unlearn(config, tiny_model, concept_data(tiny_model), tmp_path / "run", 0, unlearn_fingerprint(config, 0),
                  progress=False)
    records = log_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all("meta/after_objective" in r for r in records)
    assert all(("uce_anchor" in r) == (route == "anchor") for r in records)
    assert (out / "model_index.json").is_file()


def test_meta_on_an_edit_that_trains_no_projection_keeps_the_edit_exactly(tiny_model, tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.params=noxattn", "method.steps=2",
                         "meta.enabled=true")
    reference = DiffusionModel.load(tiny_pipeline_dir)
    make_method(config.method, "").edit(reference, concept_data(reference))
    unlearn(config, tiny_model, concept_data(tiny_model), tmp_path / "run", 0, unlearn_fingerprint(config, 0),
            progress=False)
    for name, module in projections(tiny_model.unet).items():
        assert torch.equal(module.weight, dict(reference.unet.named_parameters())[name])


@pytest.mark.parametrize("extra", [[], ["meta.enabled=true", "method.params=noxattn", "method.steps=2"]])
def test_reapply_solves_again_only_after_a_stage_that_trained_the_projections(tiny_model, tiny_pipeline_dir,
                                                                              tmp_path, extra):
    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.uce.meta_route=reapply", *extra)
    reference = DiffusionModel.load(tiny_pipeline_dir)
    make_method(config.method, "").edit(reference, concept_data(reference))  # the edit alone
    unlearn(config, tiny_model, concept_data(tiny_model), tmp_path / "run", 0, unlearn_fingerprint(config, 0),
            progress=False)
    for name, module in projections(tiny_model.unet).items():
        assert torch.equal(module.weight, dict(reference.unet.named_parameters())[name])


def test_a_closed_form_run_with_meta_resumes_like_any_other(tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.params=full", "meta.enabled=true",
                         "method.uce.meta_route=anchor", "method.lr=1e-4")
    uninterrupted = uninterrupted_run(config, tiny_pipeline_dir, tmp_path / "a")
    model = crash_then_resume(config, tiny_pipeline_dir, tmp_path / "b")  # the edit again, then the checkpoint
    assert [r["step"] for r in log_records(tmp_path / "b")] == list(range(1, 9))
    assert_same_weights(weights(model.unet), weights(uninterrupted.unet))


@pytest.mark.parametrize("name, params, trained", [("esd", "auto", "noxattn"), ("sdd", "auto", "noxattn"),
                                                   ("uce", "auto", "full"), ("rece", "auto", "full"),
                                                   ("uce", "xattn", "xattn")])
def test_params_auto_is_the_method_s_choice(name, params, trained):
    config = make_config("unused", f"method.name={name}", f"method.params={params}")
    assert make_method(config.method, "").trained_params(config.method) == trained


def test_a_rece_run_judges_its_rounds_on_held_out_samples_and_records_them(tiny_model, tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.name=rece", "method.rece.rounds=1",
                         "evaluation.concept_rate.detector=coin", "evaluation.samples_per_prompt=2",
                         "evaluation.steps=2")
    out = unlearn(config, tiny_model, concept_data(tiny_model), tmp_path / "run", 0, unlearn_fingerprint(config, 0),
                  progress=False)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    rates = record["rece"]["forget_rate_by_round"]
    assert record["status"] == "done" and record["steps"] == 0 and len(rates) == 2
    assert all(0 <= r <= 1 for r in rates) and rates[record["rece"]["kept_round"]] == min(rates)
    assert (out / "model_index.json").is_file()


def test_the_output_anchor_and_unlearn_target_use_the_edited_model(tiny_model, tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.params=full", "method.lr=1e-3",
                         "method.uce.output_anchor_weight=1", "method.steps=2", "meta.enabled=true",
                         "meta.target=unlearn_target")
    unlearn(config, tiny_model, concept_data(tiny_model), tmp_path / "run", 0, unlearn_fingerprint(config, 0),
            progress=False)
    records = log_records(tmp_path / "run")
    # step 1 starts at the edit itself: nothing to pull back yet; after one step the model has moved
    assert records[0]["uce_output_anchor"] == pytest.approx(0.0, abs=1e-12) and records[1]["uce_output_anchor"] > 0
    assert all("uce_anchor" in r and "meta/forget_after" in r for r in records)


def test_the_anchor_route_trains_weights_in_bfloat16_without_autocast(tiny_pipeline_dir, tmp_path):
    """The anchor term compares float32 keys and targets with the projections in their own dtype."""
    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.params=full", "method.steps=1",
                         "meta.enabled=true", "model.dtype=bfloat16")
    model = DiffusionModel.load(tiny_pipeline_dir, dtype=torch.bfloat16)
    unlearn(config, model, concept_data(model), tmp_path / "run", 0, unlearn_fingerprint(config, 0), progress=False)
    record = log_records(tmp_path / "run")[0]
    assert record["uce_anchor"] >= 0 and math.isfinite(record["loss"])


def test_the_judge_of_rece_rounds_never_draws_a_prompt_file_s_evaluation_seeds(tiny_model, tiny_pipeline_dir,
                                                                              tmp_path, monkeypatch):
    from metaunlearn.metrics import evaluate
    from metaunlearn.unlearn import forget_judge

    prompts = tmp_path / "forget.csv"
    prompts.write_text("prompt,evaluation_seed\na photo of a cat,5\na cat,9\n")
    config = make_config(tiny_pipeline_dir, "method.name=rece", f"evaluation.prompts.forget={prompts}",
                         "evaluation.concept_rate.detector=coin", "evaluation.samples_per_prompt=2",
                         "evaluation.steps=2")
    drawn, seeds_of = [], evaluate.evaluation_seeds
    monkeypatch.setattr(evaluate, "evaluation_seeds", lambda *a, **k: drawn.append(seeds_of(*a, **k)) or drawn[-1])
    assert 0 <= forget_judge(config, tiny_model)() <= 1
    assert len(drawn) == 1 and len(drawn[0]) == 4  # both prompts, two samples each
    assert not set(drawn[0]) & {5, 6, 9, 10}  # the evaluation's own samples of these prompts


@pytest.mark.parametrize("killed_again", [False, True])
def test_a_resumed_rece_run_replays_its_verdicts_and_keeps_its_round(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                    killed_again):
    """killed_again: the resumed run is itself killed after rewriting its record and before its edit; the
    run after it must still find the first run's verdicts there and replay them."""
    import metaunlearn.unlearn as unlearn_module
    from test_train import Crash

    never = [0.0, 0.9, 0.9]  # a second judging would keep round 0
    verdicts = {"first": iter([0.5, 0.2, 0.4]), "killed": iter(never), "again": iter(never)}
    runs = iter(["first", "killed", "again"] if killed_again else ["first", "again"])
    monkeypatch.setattr(unlearn_module, "forget_judge", lambda config, model: (lambda it: lambda: next(it))(
        verdicts[next(runs)]))
    config = make_config(tiny_pipeline_dir, "method.name=rece", "method.rece.rounds=2", "method.params=full",
                         "meta.enabled=true", "method.lr=1e-4")
    out, shared = tmp_path / "run", unlearn_module.shared_judge
    if killed_again:
        def killed(judge, replay, accelerator):
            assert replay == [0.5, 0.2, 0.4]
            raise Crash

        def interrupted_then_killed_before_the_edit(ctx):
            if ctx.step == 5:
                monkeypatch.setattr(unlearn_module, "shared_judge", killed)
                raise Crash
            return Terms()

        model = DiffusionModel.load(tiny_pipeline_dir)
        fingerprint = unlearn_fingerprint(config, 0)
        with pytest.raises(Crash):
            unlearn(config, model, concept_data(model), out, 0, fingerprint,
                    extra={"crash": interrupted_then_killed_before_the_edit}, progress=False)
        with pytest.raises(Crash):  # the resumed run, killed before its edit
            unlearn(config, DiffusionModel.load(tiny_pipeline_dir), concept_data(model), out, 0, fingerprint,
                    progress=False)
        assert json.loads((out / "run.json").read_text())["judged"] == [0.5, 0.2, 0.4]
        monkeypatch.setattr(unlearn_module, "shared_judge", shared)
        unlearn(config, DiffusionModel.load(tiny_pipeline_dir), concept_data(model), out, 0, fingerprint,
                progress=False)
    else:
        crash_then_resume(config, tiny_pipeline_dir, out)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["rece"] == {"forget_rate_by_round": [0.5, 0.2, 0.4], "kept_round": 1}
    assert next(verdicts["again"]) == 0.0  # the resumed run judged nothing


def test_the_anchor_term_is_float32_under_a_callers_autocast(tiny_model, tiny_pipeline_dir):
    """The engine used to call the method's loss inside its autocast (now the UNet's forward passes only,
    precision.py): the erase keys' outputs came out in bf16/fp16
    there, whose rounding is the size of the drift the anchor measures near the edit."""
    from metaunlearn.engine import StepContext
    from metaunlearn.params import make_trainable

    config = make_config(tiny_pipeline_dir, "method.name=uce", "method.params=full", "meta.enabled=true")
    method, data = make_method(config.method, ""), concept_data(tiny_model)
    method.edit(tiny_model, data)
    method.setup(tiny_model, make_trainable(tiny_model.unet, "full"), data)
    with torch.no_grad():  # off the edit a little, so the drift is a measurable, small number
        for name in method.targets:
            method.trainable[name].add_(1e-3 * torch.randn_like(method.trainable[name]))
    ctx = StepContext(0, torch.Generator().manual_seed(0), 2)
    exact = method.loss(ctx).losses["uce_anchor"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = method.loss(ctx).losses["uce_anchor"]
    assert exact > 0 and autocast.dtype == torch.float32
    assert torch.equal(autocast, exact)


@pytest.mark.parametrize("params, route", [("full", "anchor"), ("noxattn", "paper")])
def test_the_esd_term_of_a_closed_form_meta_stage_targets_the_model_before_the_edit(tiny_pipeline_dir, params,
                                                                                    route):
    """`esd_weight`: ESD's loss beside the meta objective on any route, its negatively guided target from the
    weights before the edit (what ESD's own teacher would be), whether or not the stage trains the edited
    projections, not from the edited model."""
    from metaunlearn.engine import StepContext
    from metaunlearn.params import make_trainable

    config = make_config(tiny_pipeline_dir, "method.name=uce", f"method.params={params}", "meta.enabled=true",
                         "method.uce.esd_weight=2", f"method.uce.meta_route={route}")
    unedited, edited = DiffusionModel.load(tiny_pipeline_dir), DiffusionModel.load(tiny_pipeline_dir)
    data = concept_data(edited)
    method = make_method(config.method, "")
    method.edit(edited, data)
    method.setup(edited, make_trainable(edited.unet, params), data)
    esd_config = make_config(tiny_pipeline_dir, "method.name=esd", "method.params=full").method
    before, after = make_method(esd_config, ""), make_method(esd_config, "")
    before.setup(unedited, make_trainable(unedited.unet, "full"), concept_data(unedited))
    after.setup(edited, make_trainable(edited.unet, "full"), data)  # ESD's target from the edited weights
    cond = data.forget.cond[torch.tensor([0, 1])]
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    torch.testing.assert_close(method.esd_target(x_t, t, cond), before.target(x_t, t, cond))
    assert not torch.allclose(method.esd_target(x_t, t, cond), after.target(x_t, t, cond), atol=1e-5)
    terms = method.loss(StepContext(0, torch.Generator().manual_seed(0), 2)).losses
    assert terms["uce_esd"] > 0 and ("uce_anchor" in terms) == (route == "anchor" and params == "full")
