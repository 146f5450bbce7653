"""Pretraining loops of the digits world: the VAE, then the UNet and text
encoder together on the VAE's latents. Plain PyTorch: these run once per world
config, on a CPU, in a few minutes."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ...conditioning import Conditioning
from ...model import DiffusionModel
from .dataset import prompts_for


def _cosine(opt, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
              generator: torch.Generator, progress=None) -> float:
    """MSE reconstruction + a small KL term; then set the latent scaling factor
    so latents have unit variance, as SD's 0.18215 does for its VAE."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine(opt, steps, warmup=min(100, steps // 10 + 1))
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def train_denoiser(model: DiffusionModel, latents: torch.Tensor, labels: torch.Tensor, steps: int,
                   batch_size: int, lr: float, prompt_dropout: float, seed: int, progress=None) -> None:
    """Train the UNet and text encoder jointly with the denoising loss; each
    image gets a random phrasing of its digit, or the empty prompt with
    probability `prompt_dropout` (what classifier-free guidance needs)."""
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    phrasings = {d: prompts_for(d) for d in range(10)}
    trainable = [*model.unet.parameters(), *encoder.parameters()]
    for module in (model.unet, encoder):
        module.train().requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-2)
    sched = _cosine(opt, steps, warmup=min(200, steps // 10 + 1))
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        prompts = ["" if rng.random() < prompt_dropout else rng.choice(phrasings[int(labels[i])]) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        cond = Conditioning(encoder(ids).last_hidden_state)
        loss = model.denoising_loss(latents[idx], cond, generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(loss.item())
    for module in (model.unet, encoder):
        module.eval().requires_grad_(False)
