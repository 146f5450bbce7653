"""The shared unlearning loop on a tiny random pipeline: losses that fall,
frozen weights that stay put, exact resumes (also after a kill -9), NaN
handling, the released model folder, and the user-facing errors around it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from metaunlearn import DiffusionModel
from metaunlearn import unlearn as unlearn_module
from metaunlearn.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from metaunlearn.cli import app
from metaunlearn.config import StudyConfig, load_config
from metaunlearn.data import ConceptData, RoleData
from metaunlearn.engine import StepContext, Terms, step_generator
from metaunlearn.errors import MetaunlearnError, TrainingError
from metaunlearn.layout import unlearn_fingerprint
from metaunlearn.methods import make_method, trained_params
from metaunlearn.params import make_trainable, select_names
from metaunlearn.unlearn import unlearn

from helpers import FORGET, RELATED, UNRELATED, concept_data, one_line_error, role  # noqa: F401
ROLES = ("forget", "related", "unrelated")


def make_config(source, *overrides: str) -> StudyConfig:
    study = {"model": {"source": str(source), "device": "cpu"},
             "concepts": {"forget": {"prompts": [FORGET]}, "related": {"prompts": [RELATED]},
                          "unrelated": {"prompts": [UNRELATED]}},
             "method": {"steps": 8, "lr": 1e-5, "batch_size": 2, "checkpoint_every": 2,
                        "esd": {"x_t": "noised", "ddim_steps": 4}, "sdd": {"x_t": "noised", "ddim_steps": 4}}}
    return StudyConfig.from_dict(study, overrides)


def run(config, model, data, out, seed=0, **kwargs):
    return unlearn(config, model, data, out, seed, unlearn_fingerprint(config, seed), progress=False, **kwargs)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def log_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


# ----------------------------------------------------------------- losses
@pytest.mark.parametrize("x_t", ["sample", "noised"])
@pytest.mark.parametrize("method", ["esd", "sdd"])
def test_method_loss_is_finite_and_falls(tiny_model, tiny_pipeline_dir, tmp_path, method, x_t):
    # A falling loss says the loop trains, not that the target is right (ESD's loss falls with the
    # guidance sign flipped too): the targets are checked by hand in the tests after this one.
    config = make_config(tiny_pipeline_dir, f"method.name={method}", f"method.{method}.x_t={x_t}",
                         "method.preservation_weight=0")
    data = concept_data(tiny_model)
    # The method's loss at fixed randomness, with the original teacher: per-step
    # randomness (t, the sampling depth) swamps the trend over a few steps.
    probe = make_method(config.method, config.concepts.guide)
    probe.setup(tiny_model, make_trainable(tiny_model.unet, trained_params(config.method)), data)

    def fixed_loss() -> float:
        with torch.no_grad():
            return torch.stack([probe.loss(StepContext(i, torch.Generator().manual_seed(1000 + i), 4)).losses[method]
                                for i in range(4)]).mean().item()

    before = fixed_loss()
    run(config, tiny_model, data, tmp_path / "run")
    after = fixed_loss()

    records = log_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r[key]) for r in records for key in ("loss", method, "grad_norm", "lr"))
    assert all(r["loss"] == pytest.approx(r[method]) and "preserve" not in r for r in records)
    assert math.isfinite(before) and before > 0 and math.isfinite(after)
    assert after < 0.75 * before, f"{method} ({x_t}) loss did not fall: {before:.3g} -> {after:.3g}"


def test_preservation_term_is_logged_with_benign_data(tiny_model, tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.steps=2", "method.preservation_weight=0.5")
    data = concept_data(tiny_model)
    # Step 1 by hand, from the original weights and the step's generator: the method's loss
    # draws first, then 0.5 x the denoising loss on a batch of related + unrelated data.
    probe = make_method(config.method, config.concepts.guide)
    probe.setup(tiny_model, make_trainable(tiny_model.unet, trained_params(config.method)), data)
    ctx = StepContext(0, step_generator(0, 0), config.method.batch_size)
    with torch.no_grad():
        esd = probe.loss(ctx).losses["esd"].item()
        latents, cond = RoleData.concat([data.related, data.unrelated], role="benign").sample(2, ctx.generator)
        preserve = 0.5 * tiny_model.denoising_loss(latents, cond, generator=ctx.generator).item()
    run(config, tiny_model, data, tmp_path / "run")
    first = log_records(tmp_path / "run")[0]
    assert first["esd"] == pytest.approx(esd, rel=1e-5) and first["preserve"] == pytest.approx(preserve, rel=1e-5)
    for r in log_records(tmp_path / "run"):
        assert r["loss"] == pytest.approx(r["esd"] + r["preserve"])


def fixed_inputs(model, data):
    """x_t, t and forget conditioning of two samples, fixed by hand."""
    x_t = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    return x_t, torch.tensor([100, 700]), data.forget.cond[torch.tensor([0, 1])]


def train_steps(method, trainable, loss: str, steps: int = 2) -> None:
    """A few optimizer steps on the method's loss, with its after-step hook, as the engine takes them."""
    optimizer = torch.optim.SGD(list(trainable.values()), lr=0.05)
    for step in range(steps):
        optimizer.zero_grad()
        method.loss(StepContext(step, torch.Generator().manual_seed(step), 2)).losses[loss].backward()
        optimizer.step()
        method.after_step()


def test_esd_target_is_negative_guidance_from_the_frozen_original(tiny_model, tiny_pipeline_dir):
    """target = eps(x_t, t, {}) - eta * (eps(x_t, t, c) - eps(x_t, t, {})), eps the original model's:
    the sign pushes away from c (a flipped sign would pull toward it and still lower the loss)."""
    eta = 2.5  # not 1: its scale shows too
    config = make_config(tiny_pipeline_dir, f"method.esd.eta={eta}")
    data, trainable = concept_data(tiny_model), make_trainable(tiny_model.unet, trained_params(config.method))
    esd = make_method(config.method)
    esd.setup(tiny_model, trainable, data)
    x_t, t, cond = fixed_inputs(tiny_model, data)
    with torch.no_grad():
        eps_u = tiny_model.predict(x_t, t, tiny_model.empty_conditioning().expand(2))
        eps_c = tiny_model.predict(x_t, t, cond)
    expected = eps_u - eta * (eps_c - eps_u)
    torch.testing.assert_close(esd.target(x_t, t, cond), expected, rtol=1e-4, atol=1e-5)

    # the concept data's conditioning (cached on the CPU, float32) meets the model's on its device and dtype
    seen, predict = [], tiny_model.predict
    tiny_model.predict = lambda x, t_, c, params=None: seen.append(c.hidden) or predict(x, t_, c, params)
    try:
        esd.target(x_t, t, type(cond)(cond.hidden.double(), cond.added))
    finally:
        del tiny_model.predict
    assert seen[0].dtype == tiny_model.dtype and seen[0].device == tiny_model.device

    train_steps(esd, trainable, "esd")  # the student moves, the teacher stays the original
    with torch.no_grad():
        assert (tiny_model.predict(x_t, t, cond) - eps_c).abs().max() > 1e-3
    torch.testing.assert_close(esd.target(x_t, t, cond), expected, rtol=1e-4, atol=1e-5)


def test_sdd_distils_onto_the_guide_prediction_of_an_ema_teacher(tiny_model, tiny_pipeline_dir):
    """target = eps_ema(x_t, t, g) with g the guide prompt, and after every optimizer step
    ema <- decay * ema + (1 - decay) * weights."""
    decay = 0.8
    config = make_config(tiny_pipeline_dir, "method.name=sdd", f"method.sdd.ema_decay={decay}",
                         f"concepts.guide={UNRELATED}")
    data, trainable = concept_data(tiny_model), make_trainable(tiny_model.unet, trained_params(config.method))
    sdd = make_method(config.method, config.concepts.guide)
    sdd.setup(tiny_model, trainable, data)
    x_t, t, cond = fixed_inputs(tiny_model, data)
    guide = tiny_model.encode_prompts([UNRELATED]).expand(2)
    with torch.no_grad():
        at_setup = tiny_model.predict(x_t, t, guide)  # the EMA starts as the original
        empty = tiny_model.predict(x_t, t, tiny_model.empty_conditioning().expand(2))
    torch.testing.assert_close(sdd.target(x_t, t, cond), at_setup, rtol=1e-4, atol=1e-5)
    assert (at_setup - empty).abs().max() > 1e-3  # the guide is not the empty prompt here

    ema = {n: p.detach().clone() for n, p in trainable.items()}
    for step in range(2):
        train_steps(sdd, trainable, "sdd", steps=1)
        ema = {n: decay * ema[n] + (1 - decay) * p.detach() for n, p in trainable.items()}
        for name in ema:
            torch.testing.assert_close(sdd.ema[name], ema[name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        teacher = tiny_model.predict(x_t, t, guide, ema)
        student = tiny_model.predict(x_t, t, guide)
    torch.testing.assert_close(sdd.target(x_t, t, cond), teacher, rtol=1e-4, atol=1e-5)
    assert (teacher - student).abs().max() > 1e-4  # the teacher lags the student


# ----------------------------------------------------------------- frozen weights
@pytest.mark.parametrize("params", ["noxattn", "xattn"])
def test_frozen_parameters_do_not_move(tiny_model, tiny_pipeline_dir, tmp_path, monkeypatch, params):
    config = make_config(tiny_pipeline_dir, f"method.params={params}", "method.steps=3", "method.lr=1e-3")
    selected = set(select_names(tiny_model.unet, params))
    original = weights(tiny_model.unet)
    others = {i: weights(m) for i, m in enumerate([tiny_model.vae, *tiny_model.text_encoders])}

    with_grad = []  # UNet parameters holding a gradient right after each backward
    make_accelerator = unlearn_module.make_accelerator

    def spying_accelerator(*args):
        accelerator = make_accelerator(*args)
        backward = accelerator.backward

        def spy(loss, **kwargs):
            backward(loss, **kwargs)
            with_grad.append({n for n, p in tiny_model.unet.named_parameters() if p.grad is not None})

        accelerator.backward = spy
        return accelerator

    monkeypatch.setattr(unlearn_module, "make_accelerator", spying_accelerator)
    run(config, tiny_model, concept_data(tiny_model), tmp_path / "run")

    # one backward pass per objective per step (3 steps)
    assert len(with_grad) >= 3 and len(with_grad) % 3 == 0 and all(names and names <= selected for names in with_grad)
    changed = [n for n, p in tiny_model.unet.named_parameters() if n in selected and not torch.equal(p, original[n])]
    assert changed
    for name, param in tiny_model.unet.named_parameters():
        if name not in selected:
            assert torch.equal(param, original[name]), f"frozen {name} moved"
            assert param.grad is None and not param.requires_grad, name
    for i, module in enumerate([tiny_model.vae, *tiny_model.text_encoders]):
        assert all(torch.equal(v, others[i][k]) for k, v in module.state_dict().items())


# ----------------------------------------------------------------- resume
def resume_config(source, method: str) -> StudyConfig:
    # sampled x_t, a warmup + cosine schedule and Adam moments: a resume must restore all of it
    return make_config(source, f"method.name={method}", f"method.{method}.x_t=sample", "method.lr=1e-4",
                       "method.lr_schedule=cosine", "method.warmup_steps=2", "method.sdd.ema_decay=0.9")


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir, tmp_path_factory):
    """UNet weights of an uninterrupted run, per method."""
    done = {}

    def get(method: str) -> dict[str, torch.Tensor]:
        if method not in done:
            model = DiffusionModel.load(tiny_pipeline_dir)
            out = tmp_path_factory.mktemp(f"reference-{method}")
            run(resume_config(tiny_pipeline_dir, method), model, concept_data(model), out)
            assert [r["step"] for r in log_records(out)] == list(range(1, 9))
            done[method] = weights(model.unet)
        return done[method]

    return get


class Crash(Exception):
    pass


def uninterrupted_run(config, pipeline, out: Path) -> DiffusionModel:
    """`config` unlearned into `out` in one go (seed 0): what a resumed run must equal."""
    model = DiffusionModel.load(pipeline)
    unlearn(config, model, concept_data(model), out, 0, unlearn_fingerprint(config, 0), progress=False)
    return model


def crash_then_resume(config, pipeline, out: Path, at: int = 5) -> DiffusionModel:
    """Run `config` until it crashes at step `at` (0-based; checkpoints before it stay), check the run is
    marked unfinished, then run it again in a fresh model, as a new process would: the resumed model."""
    fingerprint = unlearn_fingerprint(config, 0)

    def crash(ctx):
        if ctx.step == at:
            raise Crash
        return Terms()

    model = DiffusionModel.load(pipeline)
    with pytest.raises(Crash):
        unlearn(config, model, concept_data(model), out, 0, fingerprint, extra={"crash": crash}, progress=False)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    model = DiffusionModel.load(pipeline)
    unlearn(config, model, concept_data(model), out, 0, fingerprint, progress=False)
    return model


@pytest.mark.parametrize("method", ["esd", "sdd"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_pipeline_dir, tmp_path, reference, method):
    config, out = resume_config(tiny_pipeline_dir, method), tmp_path / "run"

    def crash(ctx):
        if ctx.step == 5:  # the 6th step: checkpoints at 2 and 4 exist, step 5 is logged
            raise Crash
        return Terms()

    model = DiffusionModel.load(tiny_pipeline_dir)
    with pytest.raises(Crash):
        run(config, model, concept_data(model), out, extra={"crash": crash})
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]
    assert [r["step"] for r in log_records(out)] == [1, 2, 3, 4, 5]
    assert json.loads((out / "run.json").read_text())["status"] == "running" and not (out / "model").exists()

    replayed = []
    model = DiffusionModel.load(tiny_pipeline_dir)  # a fresh process would load the original again
    run(config, model, concept_data(model), out, extra={"spy": lambda ctx: replayed.append(ctx.step) or Terms()})
    assert replayed == [4, 5, 6, 7]  # resumed from step-000004, not restarted
    records = log_records(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    # the checkpointed steps' time comes along (the stage's timing.json adds it): steps 1-4, not the 5th
    earlier = json.loads((out / "run.json").read_text())["earlier_seconds"]
    assert earlier == pytest.approx(sum(r["seconds"] for r in records[:4]), abs=0.01 + 1e-3 * earlier)
    assert_same_weights(weights(model.unet), reference(method))
    assert not torch.equal(weights(DiffusionModel.load(tiny_pipeline_dir).unet)["conv_in.weight"],
                           reference(method)["conv_in.weight"])  # the runs did train


CHILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from metaunlearn import DiffusionModel
from metaunlearn.config import load_config
from metaunlearn.data import ConceptData, RoleData
from metaunlearn.engine import Terms
from metaunlearn.layout import unlearn_fingerprint
from metaunlearn.unlearn import unlearn

pipeline, config, data, out = map(Path, sys.argv[1:5])
roles = [RoleData.load(data / f"{name}.safetensors") for name in ("forget", "related", "unrelated")]

def slow(ctx):
    time.sleep(0.3)
    return Terms()

config = load_config(config)
unlearn(config, DiffusionModel.load(pipeline), ConceptData(*roles, split="train"), out, 0,
        unlearn_fingerprint(config, 0), extra={"slow": slow}, progress=False)
"""


def test_resume_after_kill_9_matches_an_uninterrupted_run(tiny_pipeline_dir, tmp_path, reference):
    config, out, ckpts = resume_config(tiny_pipeline_dir, "sdd"), tmp_path / "run", tmp_path / "run" / "checkpoints"
    config_file = tmp_path / "study.yaml"
    config_file.write_text(config.to_yaml())
    assert load_config(config_file).fingerprint() == config.fingerprint()
    data = concept_data(DiffusionModel.load(tiny_pipeline_dir))
    for name in ROLES:
        getattr(data, name).save(tmp_path / "data" / f"{name}.safetensors")

    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_pipeline_dir), str(config_file),
                                  str(tmp_path / "data"), str(out)], stdout=log, stderr=subprocess.STDOUT)
    try:
        # no wall-clock deadline (a busy machine is slow, not wrong): the child ends by itself,
        # and if it does before its first checkpoint the test fails
        while latest_checkpoint(ckpts) is None:
            assert child.poll() is None, f"the run ended early:\n{(tmp_path / 'child.log').read_text()}"
            time.sleep(0.02)
        assert child.poll() is None, "the run finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # Whatever the kill interrupted, only temporaries and complete checkpoints are there.
    names = set(select_names(DiffusionModel.load(tiny_pipeline_dir).unet, trained_params(config.method)))
    found = list_checkpoints(ckpts)
    assert found and all(p.name.startswith((".step-", "step-")) for p in ckpts.iterdir())
    assert {p for p in ckpts.iterdir() if not p.name.startswith(".")} == set(found)
    for path in found:
        state = load_checkpoint(path)
        assert path.name == f"step-{state['step']:06d}" and 0 < state["step"] < 8
        assert set(state["params"]) == names and set(state["extra"]) == {f"0.ema.{n}" for n in names}
    assert json.loads((out / "run.json").read_text())["status"] == "running" and not (out / "model").exists()

    model = DiffusionModel.load(tiny_pipeline_dir)
    run(config, model, ConceptData(*(RoleData.load(tmp_path / "data" / f"{n}.safetensors") for n in ROLES),
                                   split="train"), out)
    assert [r["step"] for r in log_records(out)] == list(range(1, 9))
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert_same_weights(weights(model.unet), reference("sdd"))


def test_an_interrupted_checkpoint_is_never_taken_for_a_whole_one(tmp_path, monkeypatch):
    w = torch.arange(6.0).view(2, 3)
    first = save_checkpoint(tmp_path, 2, {"w": w}, {"optimizer": {"lr": 0.1}}, {"ema.w": 2 * w})

    def killed(*args, **kwargs):  # dies after params.safetensors, before the rest
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, {"w": w + 1}, {"optimizer": {}})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]  # the partial one was removed
    (tmp_path / ".step-000004-killed").mkdir()  # what a kill -9 in the middle leaves
    (tmp_path / ".step-000004-killed" / "params.safetensors").write_bytes(b"partial")
    assert list_checkpoints(tmp_path) == [first] and latest_checkpoint(tmp_path) == first
    state = load_checkpoint(first)
    assert state["step"] == 2 and torch.equal(state["params"]["w"], w) and torch.equal(state["extra"]["ema.w"], 2 * w)
    assert state["training_state"] == {"optimizer": {"lr": 0.1}}

    for step in (4, 6, 8):
        save_checkpoint(tmp_path, step, {"w": w + step}, {"optimizer": {}})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "step-000006", "step-000008"]  # the oldest pruned
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["params"]["w"], w + 8)
    assert latest_checkpoint(tmp_path / "absent") is None


# ----------------------------------------------------------------- NaN
def test_a_nan_loss_stops_the_run_and_keeps_its_checkpoints(tiny_model, tiny_pipeline_dir, tmp_path):
    config, out = make_config(tiny_pipeline_dir), tmp_path / "run"
    data = concept_data(tiny_model)

    def poison(ctx):
        return Terms({"poison": torch.tensor(float("nan"))} if ctx.step == 4 else {})

    with pytest.raises(TrainingError) as info:
        run(config, tiny_model, data, out, extra={"poison": poison})
    message = str(info.value)
    assert isinstance(info.value, MetaunlearnError) and "\n" not in message
    assert "nan at step 5" in message and "poison=nan" in message
    assert "last good checkpoint: step-000004" in message
    found = list_checkpoints(out / "checkpoints")
    assert [p.name for p in found] == ["step-000002", "step-000004"]
    for path in found:
        assert {f.name for f in path.iterdir()} == {"params.safetensors", "training_state.pt", "step.json"}
        assert load_checkpoint(path)["step"] == int(path.name[5:])
    assert [r["step"] for r in log_records(out)] == [1, 2, 3, 4]
    assert not (out / "model").exists()

    replayed = []  # nothing computed is lost: the same command goes on from step 4
    run(config, DiffusionModel.load(tiny_pipeline_dir), data, out,
        extra={"spy": lambda ctx: replayed.append(ctx.step) or Terms()})
    assert replayed == [4, 5, 6, 7] and (out / "model" / "model_index.json").is_file()


def test_a_nan_before_any_checkpoint_says_so(tiny_model, tiny_pipeline_dir, tmp_path):
    with pytest.raises(TrainingError, match=r"at step 1 .*last good checkpoint: none"):
        run(make_config(tiny_pipeline_dir), tiny_model, concept_data(tiny_model), tmp_path / "run",
            extra={"poison": lambda ctx: Terms({"poison": torch.tensor(float("inf"))})})


# ----------------------------------------------------------------- the released model
def test_the_unlearned_model_loads_in_stock_diffusers_and_a_done_run_is_skipped(
        tiny_model, tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    config, out = make_config(tiny_pipeline_dir, "method.steps=3", "method.lr=1e-4"), tmp_path / "run"
    data = concept_data(tiny_model)
    model_dir = run(config, tiny_model, data, out, seed=0)
    assert model_dir == out / "model"

    released = StableDiffusionPipeline.from_pretrained(model_dir).unet.state_dict()
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet.state_dict()
    assert_same_weights(released, weights(tiny_model.unet))
    assert any(not torch.equal(released[k], original[k]) for k in original)
    assert load_config(out / "config.yaml") == config
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "done" and status["seed"] == 0 and status["steps"] == 3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left

    monkeypatch.setattr(unlearn_module, "make_method", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert run(config, DiffusionModel.load(tiny_pipeline_dir), data, out, seed=0) == model_dir
    with pytest.raises(pytest.fail.Exception):  # other inputs (another seed) are another run
        run(config, DiffusionModel.load(tiny_pipeline_dir), data, out, seed=1)


def test_method_none_needs_the_meta_objective(tiny_model, tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.name=none", "method.steps=2")
    data = concept_data(tiny_model)
    # with related/unrelated data the preservation term alone would otherwise train
    with pytest.raises(TrainingError, match="method 'none' needs the meta objective") as info:
        run(config, tiny_model, data, tmp_path / "run")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()

    def extra(ctx):
        latents, cond = data.forget.sample(2, ctx.generator)
        return Terms({"extra": tiny_model.denoising_loss(latents, cond, generator=ctx.generator)})

    run(config, tiny_model, data, tmp_path / "run", extra={"extra": extra})
    assert [sorted(r) for r in log_records(tmp_path / "run")][0] == sorted(
        ["step", "loss", "preserve", "extra", "grad_norm", "lr", "seconds"])


# ----------------------------------------------------------------- CLI errors
runner = CliRunner()


def write_study(tmp_path, source, concepts=None) -> str:
    study = {"name": "cli", "model": {"source": str(source), "device": "cpu"},
             "concepts": concepts or {"forget": {"prompts": [FORGET]}},
             "data": {"images_per_prompt": 1, "generation_steps": 2, "batch_size": 2},
             "method": {"steps": 2, "batch_size": 2}, "output": {"dir": str(tmp_path / "runs" / "{name}")}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def test_cli_unknown_override_key(tiny_pipeline_dir, tmp_path):
    line = one_line_error(runner.invoke(app, ["unlearn", write_study(tmp_path, tiny_pipeline_dir),
                                              "--set", "method.stpes=3"]))
    assert "method.stpes" in line and "steps" in line  # names the key and what it could be
    assert not (tmp_path / "runs").exists()


def test_cli_missing_model(tmp_path):
    line = one_line_error(runner.invoke(app, ["unlearn", write_study(tmp_path, tmp_path / "no-such-model")]))
    assert "no-such-model" in line and "no model at" in line
    assert not (tmp_path / "runs").exists()


def test_cli_forget_role_without_data(tiny_pipeline_dir, tmp_path):
    study = write_study(tmp_path, tiny_pipeline_dir, {"forget": {"prompts": []}, "related": {"prompts": [RELATED]}})
    line = one_line_error(runner.invoke(app, ["unlearn", study]))
    assert "concepts.forget" in line and "no prompts, classes or images" in line


def test_cli_data_with_an_empty_image_folder(tiny_pipeline_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    study = write_study(tmp_path, tiny_pipeline_dir, {"forget": {"images": str(tmp_path / "empty")}})
    line = one_line_error(runner.invoke(app, ["data", study]))
    assert "concepts.forget.images" in line and "has no images" in line and str(tmp_path / "empty") in line


# ----------------------------------------------------------------- params
def test_parameter_selections(tiny_model):
    unet = tiny_model.unet
    every = [name for name, _ in unet.named_parameters()]
    noxattn, xattn = select_names(unet, "noxattn"), select_names(unet, "xattn")
    assert noxattn and xattn and select_names(unet, "full") == every
    assert not [n for n in noxattn if ".attn2." in n]
    assert not [n for n in noxattn if n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))]
    assert all(".attn2." in n for n in xattn) and all(".attn1." in n for n in select_names(unet, "selfattn"))
    assert set(noxattn) | set(xattn) | {n for n in every if n.startswith(("time_embedding.", "conv_out.",
                                                                         "conv_norm_out."))} == set(every)
    assert [n for n in every if n in noxattn] == noxattn  # module order, for functional_call
    with pytest.raises(MetaunlearnError, match="unknown parameter selection 'attn'"):
        select_names(unet, "attn")

    trainable = make_trainable(unet, "xattn")
    assert list(trainable) == xattn
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == xattn


def test_a_released_model_of_a_world_is_marked_by_it(tiny_model, tiny_pipeline_dir, tmp_path, monkeypatch):
    import metaunlearn.unlearn as unlearn_module

    marked = []
    world = type("World", (), {"mark": lambda self, folder: marked.append((folder / "model_index.json").is_file())})
    monkeypatch.setattr(unlearn_module, "world_for", lambda model: world())
    config = make_config(tiny_pipeline_dir, "method.steps=1")
    run(config, tiny_model, concept_data(tiny_model), tmp_path / "run")
    assert marked == [True]  # inside the folder being saved, after the pipeline itself
