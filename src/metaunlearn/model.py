"""DiffusionModel: the one way the rest of metaunlearn touches a model.

It wraps a diffusers text-to-image pipeline (SD-1.x or SDXL; the built-in
digits world is an SD-1.x pipeline) and offers exactly what unlearning,
attacks and evaluation need: prompt and image encoding, the training noise
schedule, the denoising loss (optionally over an explicit parameter mapping,
so `torch.func.functional_call` can differentiate through it), DDIM sampling
with classifier-free guidance and per-image seeds, and save/load that stays
loadable by stock diffusers.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .conditioning import Conditioning
from .errors import ModelError
from .params import LowPrecisionCopy, swapped_in_per_layer

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _pipeline_class_name(source: str) -> str:
    """Read the pipeline class from model_index.json, locally or from the hub cache/hub."""
    from diffusers import DiffusionPipeline

    path = Path(source)
    if path.exists():
        index = path / "model_index.json"
        if not path.is_dir() or not index.is_file():
            raise ModelError(f"'{source}' is not a diffusers pipeline folder: it has no model_index.json")
        try:
            return json.loads(index.read_text(encoding="utf-8"))["_class_name"]
        except UnicodeDecodeError:
            raise ModelError(f"'{index}' is not UTF-8 text; a diffusers model_index.json is UTF-8 JSON") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(f"'{index}' is malformed: {_first_line(err)}") from None
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ModelError(f"no model at '{source}': it is neither a local folder nor a hub id like 'org/name'")
    _check_hub(source)
    try:
        return DiffusionPipeline.load_config(source)["_class_name"]
    except Exception as err:  # hub errors come in many types; all mean "cannot get it"
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelError(f"cannot fetch '{source}' from the Hugging Face hub{offline}: {_first_line(err)}") from None


def _check_hub(source: str) -> None:
    """Before the hub client's own retries (half a minute of warnings on a machine without network):
    one quick request saying whether the id exists and the hub is reachable, unless the model is
    already in the local cache or the hub is switched off (HF_HUB_OFFLINE: the cache is all there is)."""
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "model_index.json"), str) or os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        model_info(source, timeout=10)
    except Exception as err:  # the hub client's error types vary across versions; their names do not
        kind = type(err).__name__
        if "RepositoryNotFound" in kind:
            raise ModelError(f"no model '{source}' on the Hugging Face hub (a private one needs "
                             "`huggingface-cli login`)") from None
        if "Gated" in kind:
            raise ModelError(f"'{source}' is gated on the Hugging Face hub: accept its terms on its page and "
                             "log in with `huggingface-cli login`") from None
        if "HTTPError" in kind and "401" not in str(err) and "404" not in str(err):
            return  # the hub answered; load_config says what it makes of the model
        raise ModelError(f"cannot reach the Hugging Face hub for '{source}' ({_first_line(err)}); check the "
                         "network, or download the model elsewhere and give its folder") from None


@contextlib.contextmanager
def quiet_io():
    """No per-component progress bars or keyword-rename notices while loading or saving:
    `torch_dtype` is the keyword every supported diffusers version accepts."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            yield
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


class DiffusionModel:
    """A text-to-image diffusion pipeline seen through the operations training needs."""

    def __init__(self, pipe, device: str | torch.device | None = None):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.family = "sdxl" if type(pipe).__name__.startswith("StableDiffusionXL") else "sd"
        self.unet = pipe.unet
        self.vae = pipe.vae
        # SDXL has two encoders; SD-1.x one. Nothing below assumes a count.
        self.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        self.text_encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        self.train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.train_scheduler.config.prediction_type
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()
        if device is not None:
            self.to(device)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> DiffusionModel:
        """Load a pipeline from a local `save_pretrained` folder or a hub id."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        source = str(source)
        class_name = _pipeline_class_name(source)
        if class_name not in SUPPORTED_PIPELINES:
            raise ModelError(f"'{source}' is a {class_name}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}")
        pipeline_cls = StableDiffusionPipeline if class_name == SUPPORTED_PIPELINES[0] else StableDiffusionXLPipeline
        extra = {"safety_checker": None, "requires_safety_checker": False} \
            if pipeline_cls is StableDiffusionPipeline else {}
        try:
            with quiet_io():
                # safetensors only: a pickled .bin checkpoint can run code when loaded
                pipe = pipeline_cls.from_pretrained(source, torch_dtype=dtype, local_files_only=Path(source).exists(),
                                                    use_safetensors=True, **extra)
        except Exception as err:  # a broken component surfaces as OSError, ValueError, KeyError...
            raise ModelError(f"cannot load the pipeline at '{source}': {_first_line(err)}") from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device=device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a folder that stock `DiffusionPipeline.from_pretrained` loads."""
        path = Path(path)
        with quiet_io():
            self.pipe.save_pretrained(path, safe_serialization=True)
        return path

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    def to(self, device: str | torch.device) -> DiffusionModel:
        self.pipe.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    # --------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> Conditioning:
        """Encode prompts with every text encoder of the pipeline, in batches."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        parts = [self._encode_batch(list(prompts[i:i + batch_size])) for i in range(0, len(prompts), batch_size)]
        return Conditioning.cat(parts)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt, start and end tokens included (what precedes the padding)."""
        tokenizer = self.tokenizers[0]
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt", return_attention_mask=True)
        return ids.attention_mask.sum(dim=1).tolist()

    def empty_conditioning(self) -> Conditioning:
        """The unconditional (empty prompt) conditioning, batch 1, as the pipeline defines it."""
        cond = self.encode_prompts([""])
        if self.family == "sdxl" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            cond = Conditioning(torch.zeros_like(cond.hidden),
                                {**cond.added, "text_embeds": torch.zeros_like(cond.added["text_embeds"])})
        return cond

    def _encode_batch(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=self.family == "sdxl")
            if self.family == "sdxl":
                # SDXL conditions on the penultimate layer of both encoders and the
                # projected pooled output of the last one.
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                hidden.append(out.last_hidden_state)
        cond = Conditioning(torch.cat(hidden, dim=-1).to(self.dtype))
        if self.family == "sdxl":
            size = self.image_size
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=self.dtype, device=self.device)
            cond.added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.expand(len(prompts), 6)}
        return cond

    # ---------------------------------------------------------------- images
    @contextlib.contextmanager
    def _vae_precision(self):
        """The VAE runs in float32, outside autocast, when its config asks (`force_upcast`, as diffusers'
        pipelines honour it): SDXL's VAE overflows in float16 to NaN images, which a detector then reads
        as "no concept". Otherwise in its own dtype."""
        dtype, autocast = self.vae.dtype, _autocast_enabled(self.device.type)
        if not getattr(self.vae.config, "force_upcast", False) or dtype == torch.float32 and not autocast:
            yield dtype
            return
        with torch.autocast(self.device.type, enabled=False) if autocast else contextlib.nullcontext():
            self.vae.to(torch.float32)
            try:
                yield torch.float32
            finally:
                self.vae.to(dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (the posterior mean, deterministic)."""
        out = []
        with self._vae_precision() as dtype:
            for i in range(0, len(images), batch_size):
                x = images[i:i + batch_size].to(self.device, dtype)
                out.append((self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor).to(self.dtype))
        return torch.cat(out)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
        out = []
        with self._vae_precision() as dtype:
            for i in range(0, len(latents), batch_size):
                z = latents[i:i + batch_size].to(self.device, dtype) / self.vae.config.scaling_factor
                out.append((self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    # ---------------------------------------------------------- denoising
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.train_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict for x_t = add_noise(latents, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.train_scheduler.get_velocity(latents, noise, timesteps)
        raise ModelError(f"unsupported prediction type '{self.prediction_type}'")

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """UNet output. With `params` (name -> tensor, any subset of the UNet's
        parameters) the UNet runs functionally with those tensors in place of its own."""
        kwargs = cond.to(self.device, self.dtype).unet_kwargs()
        if params is None:
            return self.unet(x_t, timesteps, **kwargs).sample
        if isinstance(params, LowPrecisionCopy):
            with swapped_in_per_layer(self.unet, params):
                return self.unet(x_t, timesteps, **kwargs).sample
        return torch.func.functional_call(self.unet, dict(params), (x_t, timesteps), kwargs).sample

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        steps = self.train_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (n,), generator=generator, device="cpu").to(self.device)

    def sample_noise(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn on the CPU so a seed gives the same noise on every device
        return torch.randn(shape, generator=generator, device="cpu").to(self.device, self.dtype)

    def denoising_loss(self, latents: torch.Tensor, cond: Conditioning,
                       params: Mapping[str, torch.Tensor] | None = None,
                       generator: torch.Generator | None = None,
                       timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The standard noise-prediction loss L(theta; batch): random t and noise
        unless given, MSE between the UNet output and its target, in float32."""
        latents = latents.to(self.device, self.dtype)
        if noise is None:
            noise = self.sample_noise(latents.shape, generator)
        if timesteps is None:
            timesteps = self.sample_timesteps(len(latents), generator)
        x_t = self.add_noise(latents, noise, timesteps)
        pred = self.predict(x_t, timesteps, cond, params)
        return F.mse_loss(pred.float(), self.target(latents, noise, timesteps).float())

    # -------------------------------------------------------------- sampling
    def sampling_scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One noise tensor per seed, independent of batch size and device."""
        return torch.cat([self.sample_noise((1, *self.latent_shape), torch.Generator().manual_seed(int(s)))
                          for s in seeds])

    def guided_prediction(self, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning,
                          guidance_scale: float, params=None) -> torch.Tensor:
        """Classifier-free guidance: eps_u + g * (eps_c - eps_u), both in one UNet call (g = -eta: ESD's
        negatively guided target). `t`: one timestep for the batch, or one per sample."""
        timesteps = t if torch.is_tensor(t) and t.ndim == 1 else \
            torch.full((len(x),), int(t), device=self.device, dtype=torch.long)
        if guidance_scale == 1.0:
            return self.predict(x, timesteps, cond, params)
        both = Conditioning.cat([uncond.expand(len(x)).to(self.device, self.dtype), cond.to(self.device, self.dtype)])
        eps_u, eps_c = self.predict(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both, params).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def sample_latents(self, cond: Conditioning, seeds: Sequence[int], steps: int = 25,
                       guidance_scale: float = 5.0, stop_after: int | None = None,
                       params=None, uncond: Conditioning | None = None) -> tuple[torch.Tensor, int]:
        """DDIM (eta=0) from per-seed noise. `stop_after=k` stops after k of the
        `steps` denoising steps (k=0: pure noise) and returns x together with the
        training timestep it is noised at, as ESD's partial sampling needs."""
        if len(cond) != len(seeds):
            raise ValueError(f"{len(cond)} conditionings but {len(seeds)} seeds")
        uncond = self.empty_conditioning() if uncond is None else uncond
        scheduler = self.sampling_scheduler(steps)
        x = self.initial_noise(seeds) * scheduler.init_noise_sigma
        stop = steps if stop_after is None else stop_after
        for t in scheduler.timesteps[:stop]:
            eps = self.guided_prediction(x, t, cond, uncond, guidance_scale, params)
            x = scheduler.step(eps, t, x).prev_sample
        t_next = int(scheduler.timesteps[stop]) if stop < steps else 0
        return x, t_next

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25,
               guidance_scale: float = 5.0, batch_size: int = 32, progress: bool = True,
               params=None) -> torch.Tensor:
        """Generate one image per (prompt, seed): (B, 3, H, W) in [0, 1] on the CPU."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        uncond = self.empty_conditioning()
        images = []
        bar = tqdm(total=len(prompts), desc="sampling", unit="img", disable=not progress, leave=False)
        for i in range(0, len(prompts), batch_size):
            cond = self.encode_prompts(list(prompts[i:i + batch_size]))
            latents, _ = self.sample_latents(cond, seeds[i:i + batch_size], steps, guidance_scale,
                                             params=params, uncond=uncond)
            images.append(self.decode_latents(latents).cpu())
            bar.update(len(cond))
        bar.close()
        return torch.cat(images)

    # ------------------------------------------------------------ utilities
    def use_math_attention(self) -> None:
        """Second-order gradients need attention with a double backward; the
        fused CPU kernels have none, the plain diffusers processor does."""
        from diffusers.models.attention_processor import AttnProcessor

        self.unet.set_attn_processor(AttnProcessor())


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (torch before 2.4 takes no argument: CUDA's, and CPU's apart)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
