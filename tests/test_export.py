"""`metaunlearn export --as lora`: an "unlearned" copy of a tiny pipeline that differs from it by
known rank-2 changes (conv and attention weights, one bias) comes back exactly through
pipe.load_lora_weights, fused or not; lower ranks capture what the SVD says; the energy rule picks
the smallest rank; bad input is one line. SD-1.x and SDXL, offline, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clean_exit, one_line_error
from typer.testing import CliRunner

from metaunlearn import DiffusionModel, MetaunlearnError
from metaunlearn.cli import app
from metaunlearn.export import REPORT, WEIGHTS, default_out, export_lora, summary

WORDS = ["a", "photo", "of", "the", "digit", "eight", "three", "one", "dog", "cat"]
runner = CliRunner()
# down_blocks.0's conv sorts before every attention key: diffusers' loader picks the key format from
# the first key, so a conv first and attention after is the mix that once lost the attention layers
CONV, OUT, FF = ("down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
                 "mid_block.attentions.0.transformer_blocks.0.ff.net.2")
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a layer with no bias
SMALL = "conv_out"  # 4 output channels: smaller than rank 8


def _change(pipe, layers, bias: str | None, seed: int = 1) -> dict[str, np.ndarray]:
    """Add a rank-2 change to each layer's weight (and a change to `bias`); the changes, as matrices."""
    g, modules, changes = torch.Generator().manual_seed(seed), dict(pipe.unet.named_modules()), {}
    with torch.no_grad():
        for name in layers:
            w = modules[name].weight
            delta = torch.randn(len(w), 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g) * 0.05
            w += delta.reshape(w.shape)
            changes[name] = delta.double().numpy()
        if bias:
            modules[bias].bias += 0.1 * torch.randn(modules[bias].bias.shape, generator=g)
    return changes


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base, 'fusable' (conv, to_out and ff weights, to_out's bias, conv_out), 'unfusable' (adds to_q,
    which has no bias, and a text encoder change), 'other' (another architecture), sdxl and sdxl-new."""
    from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline, build_sdxl_pipeline

    root, out = tmp_path_factory.mktemp("export"), {}
    for name in ("base", "fusable", "unfusable"):
        pipe = build_pipeline(TinyPipelineConfig(), WORDS, seed=0)
        if name == "fusable":
            out["changes"] = _change(pipe, [CONV, OUT, FF, SMALL], bias=f"{OUT}")
        if name == "unfusable":
            _change(pipe, [CONV, OUT, TO_Q], bias=f"{OUT}")
            with torch.no_grad():  # and the text encoder, which a UNet LoRA cannot carry
                pipe.text_encoder.get_parameter("final_layer_norm.weight").add_(0.1)
        pipe.save_pretrained(root / name / "model")
        out[name] = root / name / "model"
    build_pipeline(TinyPipelineConfig(unet_channels=(16, 32)), WORDS, seed=0).save_pretrained(root / "other")
    sdxl = build_sdxl_pipeline(TinyPipelineConfig(), WORDS, seed=0)
    sdxl.save_pretrained(root / "sdxl")
    _change(sdxl, [CONV, "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"], bias=None)
    sdxl.save_pretrained(root / "sdxl-new")
    out.update(other=root / "other", sdxl=root / "sdxl", sdxl_new=root / "sdxl-new", root=root)
    return out


def _unet_out(model: DiffusionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), encoder_hidden_states=c).sample


def _with_lora(base, folder, fuse: bool) -> DiffusionModel:
    from peft.tuners.lora import LoraLayer

    model = DiffusionModel.load(base)
    model.pipe.load_lora_weights(folder)
    report = json.loads((folder / REPORT).read_text())
    assert sum(isinstance(m, LoraLayer) for m in model.unet.modules()) == report["layers"]  # none dropped
    if fuse:
        model.pipe.fuse_lora()
        model.pipe.unload_lora_weights()
    return model


def _weight_gap(a: DiffusionModel, b: DiffusionModel, skip=()) -> float:
    pb = dict(b.unet.named_parameters())
    return max((p - pb[k]).abs().max().item() for k, p in a.unet.named_parameters() if k not in skip)


def test_rank_2_with_biases_reproduces_the_unlearned_unet_fused_or_not(folders, tmp_path):
    report = export_lora(folders["fusable"], folders["base"], tmp_path / "lora", rank=2, bias=True)
    assert report["rank"] == 2 and report["layers"] == 4 and report["biases"] and report["fusable"]
    assert report["other_components_differ"] == []
    assert report["captured_share"] == pytest.approx(1, abs=1e-6) and report["not_captured_top"] == []
    assert (tmp_path / "lora" / WEIGHTS).is_file() and report["adapter_mb"] > 0
    unlearned = DiffusionModel.load(folders["fusable"])
    want = _unet_out(unlearned)
    for fuse in (False, True):
        model = _with_lora(folders["base"], tmp_path / "lora", fuse)
        assert (_unet_out(model) - want).abs().max() < 1e-5
    assert _weight_gap(model, unlearned) < 1e-5  # fused: every UNet weight and bias is the unlearned one


def test_without_biases_the_bias_is_reported_as_not_captured(folders, tmp_path):
    report = export_lora(folders["fusable"], folders["base"], tmp_path / "lora", rank=2)
    assert not report["biases"] and report["fusable"]
    assert [p["name"] for p in report["not_captured_top"]] == [f"{OUT}.bias"]
    assert report["not_representable_share"] == pytest.approx(1 - report["captured_share"], abs=1e-6)
    assert report["not_representable_share"] > 0
    model, unlearned = _with_lora(folders["base"], tmp_path / "lora", True), DiffusionModel.load(folders["fusable"])
    assert _weight_gap(model, unlearned, skip={f"{OUT}.bias"}) < 1e-5
    assert _weight_gap(model, unlearned) > 1e-3  # the bias alone stays the original's


@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")  # peft says it on load: that is the point here
def test_biases_of_layers_without_one_load_unfused_only(folders, tmp_path):
    report = export_lora(folders["unfusable"], folders["base"], tmp_path / "lora", rank=2, bias=True)
    assert report["biases"] and not report["fusable"] and report["other_components_differ"] == ["text_encoder"]
    assert "unfused only" in summary(report) and "not exported: text_encoder" in summary(report)
    model = _with_lora(folders["base"], tmp_path / "lora", fuse=False)
    assert (_unet_out(model) - _unet_out(DiffusionModel.load(folders["unfusable"]))).abs().max() < 1e-5


def test_rank_1_captures_the_top_singular_value_of_each_change(folders, tmp_path):
    base, new = DiffusionModel.load(folders["base"]), DiffusionModel.load(folders["fusable"])
    pb = dict(base.unet.named_parameters())
    sq = {k: float(((p.double() - pb[k].double()) ** 2).sum()) for k, p in new.unet.named_parameters()}
    total = sum(sq.values())
    top = {name: np.linalg.svd(delta, compute_uv=False) for name, delta in folders["changes"].items()}
    want = sum(float(s[0] ** 2) for s in top.values()) / total  # the changes' SVD, never seen by export
    report = export_lora(folders["fusable"], folders["base"], tmp_path / "r1", rank=1)
    assert report["captured_share"] < 1 and report["captured_share"] == pytest.approx(want, rel=1e-4)
    assert report["truncated_share"] == pytest.approx(sum(float(s[1] ** 2) for s in top.values()) / total, rel=1e-3)
    # the energy rule: the smallest rank that reaches the share
    rank_2 = export_lora(folders["fusable"], folders["base"], tmp_path / "r2", rank=2)["captured_share"]
    assert export_lora(folders["fusable"], folders["base"], tmp_path / "e1", energy=want * 0.999)["rank"] == 1
    chosen = export_lora(folders["fusable"], folders["base"], tmp_path / "e2", energy=(want + rank_2) / 2)
    assert chosen["rank"] == 2 and chosen["energy_reached"] and chosen["rank_rule"] == f"energy {(want + rank_2) / 2}"
    # beyond what matrices hold (the bias is not carried): all a LoRA can, and said so
    unreachable = export_lora(folders["fusable"], folders["base"], tmp_path / "e3", energy=1.0)
    assert unreachable["rank"] == 2 and unreachable["energy_reached"] is False


def test_sdxl_round_trip(folders, tmp_path):
    report = export_lora(folders["sdxl_new"], folders["sdxl"], tmp_path / "lora", rank=2)
    assert report["layers"] == 2 and report["captured_share"] == pytest.approx(1, abs=1e-6)
    model = _with_lora(folders["sdxl"], tmp_path / "lora", fuse=True)
    assert model.family == "sdxl" and _weight_gap(model, DiffusionModel.load(folders["sdxl_new"])) < 1e-5


def test_cli_export_at_a_rank_above_some_layers_sizes_next_to_the_model(folders):
    result = clean_exit(runner.invoke(app, ["export", str(folders["fusable"]), "--as", "lora",
                                            "--base", str(folders["base"]), "--rank", "8", "--bias"]))
    out = folders["root"] / "fusable" / "lora"  # the default: next to the model folder
    assert default_out(folders["fusable"]) == out.resolve() and (out / WEIGHTS).is_file()
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("LoRA rank 8 (fixed): 4 layers") and "fuse_lora" in lines[2]
    assert json.loads((out / REPORT).read_text())["rank"] == 8
    model = _with_lora(folders["base"], out, fuse=True)  # conv_out keeps rank 4 (rank_pattern)
    assert _weight_gap(model, DiffusionModel.load(folders["fusable"])) < 1e-5
    again = runner.invoke(app, ["export", str(folders["fusable"]), "--base", str(folders["base"]), "--rank", "1"])
    clean_exit(again)  # a new export replaces its own files in the folder
    assert json.loads((out / REPORT).read_text())["rank"] == 1
    assert default_out("org/some-model") == Path("some-model-lora")  # a hub id: in the current folder


@pytest.mark.parametrize("args, message", [
    (["{fusable}", "--base", "{other}"], "different architectures"),
    (["{fusable}", "--base", "{sdxl}"], "different architectures"),
    (["{base}", "--base", "{base}"], "nothing to export"),
    (["{fusable}", "--base", "{base}", "--as", "ckpt"], "cannot export as 'ckpt'"),
    (["{fusable}", "--base", "{base}", "--rank", "0"], "--rank must be at least 1"),
    (["{fusable}", "--base", "{base}", "--energy", "1.5"], "--energy must be in (0, 1]"),
    (["{fusable}", "--base", "{base}", "--out", "{root}"], "holds other files"),
    (["{root}/missing", "--base", "{base}"], "no model at"),
])
def test_bad_input_is_one_line(folders, args, message):
    argv = ["export", *(a.format(**folders) for a in args)]
    assert message in one_line_error(runner.invoke(app, argv))


def test_library_errors_are_metaunlearn_errors(folders, tmp_path):
    with pytest.raises(MetaunlearnError, match="nothing to export"):
        export_lora(folders["sdxl"], folders["sdxl"], tmp_path / "x")
