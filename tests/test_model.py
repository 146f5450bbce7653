"""DiffusionModel on a tiny random SD-1.x pipeline: round trip, loss, sampling, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from metaunlearn import Conditioning, DiffusionModel, ModelError


def test_save_load_with_stock_diffusers_and_sample(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_model.save(tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    out = pipe("a photo of the digit eight", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    reloaded = DiffusionModel.load(tmp_path / "saved")
    for (name, a), b in zip(tiny_model.unet.state_dict().items(), reloaded.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_sample_shapes_finite_and_seeded(tiny_model):
    prompts = ["a photo of the digit eight", "a dog", "a cat"]
    a = tiny_model.sample(prompts, [0, 1, 2], steps=3, progress=False)
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1
    # the same seed gives the same image, whatever the batch it is drawn in
    b = tiny_model.sample(prompts[1:], [1, 2], steps=3, batch_size=1, progress=False)
    torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-5)
    c = tiny_model.sample(prompts, [5, 1, 2], steps=3, progress=False)
    assert not torch.allclose(a[0], c[0])


def test_encode_prompts_and_images(tiny_model):
    cond = tiny_model.encode_prompts(["a dog", "a cat", "eight"], batch_size=2)
    assert cond.hidden.shape == (3, 16, 32) and cond.added == {}
    assert len(cond[1:]) == 2 and len(Conditioning.cat([cond, cond[0]])) == 4
    assert not torch.allclose(cond.hidden[0], cond.hidden[1])
    uncond = tiny_model.empty_conditioning().expand(3)
    assert uncond.hidden.shape == cond.hidden.shape
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = tiny_model.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    assert tiny_model.decode_latents(latents).shape == (2, 3, 32, 32)
    with pytest.raises(TypeError):
        tiny_model.encode_prompts("a dog")


def test_loss_differentiable_through_functional_call(tiny_model):
    latents = torch.randn(2, 4, 8, 8)
    cond = tiny_model.encode_prompts(["a dog", "a cat"])
    names = [n for n, _ in tiny_model.unet.named_parameters() if "attn2" in n]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in tiny_model.unet.named_parameters() if n in names}

    def loss_with(p):
        return tiny_model.denoising_loss(latents, cond, params=p, generator=torch.Generator().manual_seed(3))

    loss = loss_with(params)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # same value as the module's own parameters, and a second derivative exists
    assert torch.allclose(loss, tiny_model.denoising_loss(latents, cond, generator=torch.Generator().manual_seed(3)))
    tiny_model.use_math_attention()
    loss = loss_with(params)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    (hvp,) = torch.autograd.grad(sum((g * g).sum() for g in grads), [params[names[0]]])
    assert torch.isfinite(hvp).all()
    # functional parameters must not leak into the module
    assert all(not p.requires_grad for p in tiny_model.unet.parameters())


def test_partial_sampling_returns_noise_level(tiny_model):
    cond = tiny_model.encode_prompts(["a dog"])
    x0, t0 = tiny_model.sample_latents(cond, [7], steps=10, stop_after=0)
    torch.testing.assert_close(x0, tiny_model.initial_noise([7]))  # k = 0: pure noise
    assert t0 == int(tiny_model.sampling_scheduler(10).timesteps[0])
    x5, t5 = tiny_model.sample_latents(cond, [7], steps=10, stop_after=5)
    assert 0 < t5 < t0 and not torch.allclose(x5, x0)


def test_missing_path_fails_clearly(tmp_path):
    with pytest.raises(ModelError, match="neither a local folder nor a hub id"):
        DiffusionModel.load(tmp_path / "does" / "not" / "exist")


def test_unreachable_hub_id_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot fetch 'nobody/no-such-model'"):
        DiffusionModel.load("nobody/no-such-model")


def test_folder_without_index_fails_clearly(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        DiffusionModel.load(tmp_path)


def test_malformed_pipeline_folder_fails_clearly(tiny_pipeline_dir, tmp_path):
    broken = shutil.copytree(tiny_pipeline_dir, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelError, match="cannot load the pipeline"):
        DiffusionModel.load(broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="malformed"):
        DiffusionModel.load(broken)


def test_unsupported_pipeline_fails_clearly(tiny_pipeline_dir, tmp_path):
    other = shutil.copytree(tiny_pipeline_dir, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="supported pipelines"):
        DiffusionModel.load(other)


@pytest.mark.parametrize("error, message", [
    (type("RepositoryNotFoundError", (Exception,), {}), "no model 'nobody/no-such-model' on the Hugging Face hub"),
    (type("GatedRepoError", (Exception,), {}), "is gated on the Hugging Face hub"),
    (type("ConnectError", (Exception,), {}), "cannot reach the Hugging Face hub for 'nobody/no-such-model' (down)"),
])
def test_a_hub_id_is_checked_with_one_request_before_any_retries(monkeypatch, error, message):
    import huggingface_hub

    calls = []

    def model_info(repo, timeout=None):
        calls.append((repo, timeout))
        raise error("down")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelError) as info:
        DiffusionModel.load("nobody/no-such-model")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert calls == [("nobody/no-such-model", 10)]  # one request, with a timeout


@pytest.mark.parametrize("force_upcast", [True, False])
def test_the_vae_runs_in_float32_outside_autocast_when_its_config_asks(tiny_pipeline_dir, force_upcast):
    """SDXL's VAE overflows in half precision (its config says force_upcast, as diffusers' pipelines honour
    it); a VAE that does not ask keeps its dtype. The model's own dtype is put back afterwards."""
    model = DiffusionModel.load(tiny_pipeline_dir, dtype=torch.bfloat16)
    model.vae.register_to_config(force_upcast=force_upcast)
    seen = []
    hook = model.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    encoder = model.vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    images = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation's half precision
        latents = model.encode_images(images)
        decoded = model.decode_latents(latents)
    hook.remove(), encoder.remove()
    expected = torch.float32 if force_upcast else torch.bfloat16
    assert seen == [(expected, expected)] * 2 and model.vae.dtype == torch.bfloat16
    assert latents.dtype == torch.bfloat16 and decoded.dtype == torch.float32 and decoded.isfinite().all()


def test_whether_autocast_is_on_is_read_on_torch_before_2_4_too(monkeypatch):
    from metaunlearn import model as model_module

    assert not model_module._autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_module._autocast_enabled("cpu")
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda: False)  # 2.1-2.3: no device argument
        assert model_module._autocast_enabled("cpu") and not model_module._autocast_enabled("cuda")
