"""SDXL end to end on a tiny SDXL pipeline built offline (two text encoders,
pooled embeddings, time ids): loading and conditioning, a whole study (concept
data, ESD-u with and without the meta objective, full and LoRA attacks,
evaluation, report), every other base method and second-order meta, and the
SDXL config run with its own settings made small."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BrightDetector, build_tiny_clip
from test_study import FULL, LORA, tiny_study

from metaunlearn import DiffusionModel
from metaunlearn.config import StudyConfig, load_config
from metaunlearn.study import run_study

WORDS = ["a", "photo", "of", "the", "digit", "eight", "three", "dog", "nude", "woman", "man"]
assert BrightDetector  # registers detector 'bright'


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl") / "pipeline"
    build_sdxl_pipeline(TinyPipelineConfig(), WORDS, seed=0).save_pretrained(folder)
    return folder


def test_a_tiny_sdxl_pipeline_loads_with_sdxl_conditioning(sdxl_dir):
    model = DiffusionModel.load(sdxl_dir)
    assert model.family == "sdxl" and len(model.text_encoders) == 2
    cond = model.encode_prompts(["a photo of the digit eight", "a dog"])
    assert cond.hidden.shape == (2, 16, 32 + 64)  # both encoders' penultimate states side by side
    assert cond.added["text_embeds"].shape == (2, 64)
    assert cond.added["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]  # original size, crop, target size
    empty = model.empty_conditioning()  # force_zeros_for_empty_prompt, as SDXL's pipeline does
    assert not empty.hidden.any() and not empty.added["text_embeds"].any()
    images = model.sample(["a dog", "a dog"], [1, 2], steps=2)
    assert images.shape == (2, 3, 32, 32) and not torch.equal(images[0], images[1])
    assert torch.allclose(model.sample(["a dog"], [2], steps=2)[0], images[1], atol=1e-5)  # per-seed noise


def test_a_tiny_sdxl_study_runs_every_stage(sdxl_dir, tmp_path):
    run = tmp_path / "run"
    study = tiny_study(sdxl_dir, run, seeds=(0,), attacks=(FULL, LORA))
    outcome = run_study(StudyConfig.from_dict(study), progress=False)
    assert outcome.failures == [] and outcome.report == run / "report.html"
    results = json.loads((run / "results.json").read_text())
    for attack in ("full", "lora"):
        rows = results["attacks"][attack]["rows"]
        assert [r["curves"] for r in rows.values()] == [1, 1, 1]
    unlearned = DiffusionModel.load(run / "unlearn" / "esd-meta-seed0" / "model")
    assert unlearned.family == "sdxl"


@pytest.mark.parametrize("method, params, meta", [
    ("esd", "xattn", "second_order"),  # ESD-x, differentiating through the simulated attack
    ("sdd", "auto", "first_order"),
    ("uce", "auto", "first_order"),
    ("rece", "auto", None)])
def test_every_base_method_and_meta_order_unlearns_an_sdxl_model(sdxl_dir, tmp_path, method, params, meta):
    from metaunlearn import stages

    study = tiny_study(sdxl_dir, tmp_path / "run", seeds=(0,), variants=("meta" if meta else "base",), attacks=())
    study["method"].update(name=method, params=params, steps=2)
    study["meta"].update(enabled=meta is not None, mode=meta or "first_order")
    config = StudyConfig.from_dict(study)
    out = stages.run_unlearn(config, 0, progress=False)
    before, after = DiffusionModel.load(sdxl_dir).unet.state_dict(), DiffusionModel.load(out).unet.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, f"{method} changed no UNet weight"
    if params == "xattn":  # ESD-x trains the cross-attention only
        assert all("attn2" in name for name in changed)
    if method in ("uce", "rece") and meta is None:  # the closed forms edit the key/value projections only
        assert all("attn2.to_k" in name or "attn2.to_v" in name for name in changed)


def test_the_sdxl_nudity_config_unlearns_and_evaluates_a_tiny_sdxl(sdxl_dir, tmp_path):
    pytest.importorskip("nudenet")
    from PIL import Image

    from metaunlearn import stages

    clip = build_tiny_clip(tmp_path / "clip")
    coco = tmp_path / "coco"
    coco.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 30, 90)).save(coco / f"{i}.png")
    config = load_config("configs/sdxl-nudity.yaml", [
        f"model.source={sdxl_dir}", "model.mixed_precision=no", "model.device=cpu", "seeds=[0]",
        "data.images_per_prompt=1", "data.generation_steps=2", "method.steps=2", "method.esd.ddim_steps=2",
        "evaluation.samples_per_prompt=1", "evaluation.steps=2", f"evaluation.clip_score.model={clip}",
        "evaluation.fid.features=clip", f"evaluation.fid.clip.model={clip}",
        f"evaluation.fid.reference.unrelated={coco}",
        f"output.dir={tmp_path / 'run'}"])
    assert config.method.params == "xattn" and config.model.source == str(sdxl_dir)
    # its memory switches (checkpointing, the bf16 teacher) run here with the meta objective in place
    assert config.method.gradient_checkpointing and config.method.frozen_dtype == "bfloat16"
    meta = config.model_copy(update={"meta": config.meta.model_copy(update={"enabled": True})})
    out = stages.run_unlearn(meta, 0, progress=False)
    results, _ = stages.run_evaluate(meta, out, "esd-meta-seed0", progress=False)
    values = results["values"]
    assert values["forget_rate"] is not None and values["forget_rate@0.45"] is not None
    assert values["clip_score_unrelated"] is not None and values["fid_unrelated"] is not None


def test_esd_u_leaves_sdxl_s_added_conditioning_embedding_alone(sdxl_dir):
    from metaunlearn.params import select_names

    unet = DiffusionModel.load(sdxl_dir).unet
    added = [n for n, _ in unet.named_parameters() if n.startswith("add_embedding.")]
    assert added and not set(added) & set(select_names(unet, "noxattn"))
    assert set(added) <= set(select_names(unet, "full"))
