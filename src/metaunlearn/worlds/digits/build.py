"""The built-in digits world: a tiny, real StableDiffusionPipeline trained on
scikit-learn's digits, plus its concept detector (a digit classifier).

`build_world(config)` trains it from scratch in a few CPU minutes and writes a
folder that stock diffusers loads; `get_world(config)` returns the cached
folder for that config, building it only when the config (or the world
format) changed. Everything is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ...layout import atomic_dir
from ...model import DiffusionModel
from .. import WORLD_FILE as REPORT_FILE
from .. import worlds_root
from ..pipeline import TinyPipelineConfig, build_pipeline
from .classifier import DigitClassifier, train_classifier
from .dataset import load_split, prompts_for, vocabulary
from .detector import CLASSIFIER_DIR
from .pretrain import train_denoiser, train_vae

WORLD_FORMAT = 1  # bump when the build changes in a way the config does not show


@dataclass
class DigitsWorldConfig:
    pipeline: TinyPipelineConfig = field(default_factory=lambda: TinyPipelineConfig(
        vae_channels=(16, 32, 32), unet_channels=(32, 64), unet_attention=(False, True),
        text_width=64, text_heads=4))
    seed: int = 0
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3
    unet_steps: int = 1200
    unet_batch: int = 64
    unet_lr: float = 1e-3
    prompt_dropout: float = 0.1
    detector_steps: int = 400
    # evaluation of the finished world
    eval_samples_per_digit: int = 100
    eval_steps: int = 20
    guidance_scale: float = 5.0

    def __post_init__(self):
        if isinstance(self.pipeline, dict):
            self.pipeline = TinyPipelineConfig(**self.pipeline)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        blob = json.dumps({"format": WORLD_FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def wide(cls) -> DigitsWorldConfig:
        """The default world with twice the UNet's channels (about 4x its weights): does a result depend on
        how little room the default UNet has to keep concepts apart?"""
        return cls(pipeline=replace(cls().pipeline, unet_channels=(64, 128)))

    @classmethod
    def reduced(cls) -> DigitsWorldConfig:
        """Seconds to build, useless for quality: for tests."""
        return cls(pipeline=TinyPipelineConfig(), vae_steps=4, vae_batch=8, unet_steps=4, unet_batch=8,
                   detector_steps=4, eval_samples_per_digit=2, eval_steps=2)


def world_folder(config: DigitsWorldConfig) -> Path:
    return worlds_root() / f"digits-{config.key()}"


def get_world(config: DigitsWorldConfig | None = None, rebuild: bool = False, log=print) -> Path:
    """The folder of the world for `config`, built (once) if not cached."""
    config = config or DigitsWorldConfig()
    target = world_folder(config)
    if (target / REPORT_FILE).is_file() and not rebuild:
        return target
    with atomic_dir(target) as tmp:  # an interrupted build never looks finished
        build_world(config, tmp, log=log)
    return target


def _stage(log, name: str):
    """Context manager that times a build stage and shows a progress bar."""
    from contextlib import contextmanager

    from tqdm.auto import tqdm

    @contextmanager
    def run(total: int, timings: dict):
        start = time.perf_counter()
        bar = tqdm(total=total, desc=name, leave=False, disable=total <= 0)

        def step(loss: float | None = None):
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        yield step
        bar.close()
        timings[name] = round(time.perf_counter() - start, 2)
        log(f"  {name}: {timings[name]:.1f} s")

    return run


def build_world(config: DigitsWorldConfig, out: str | Path, log=print) -> dict:
    """Train the world from scratch into `out`; returns (and writes) its report."""
    out = Path(out)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)
    size = config.pipeline.image_size
    train_x, train_y = load_split("train", size, seed=config.seed)
    test_x, test_y = load_split("test", size, seed=config.seed)
    model = DiffusionModel(build_pipeline(config.pipeline, vocabulary(), seed=config.seed))
    generator = torch.Generator().manual_seed(config.seed)
    log(f"building the digits world ({len(train_x)} training digits) into {out}")

    with _stage(log, "vae")(config.vae_steps, timings) as step:
        train_vae(model.vae, train_x, config.vae_steps, config.vae_batch, config.vae_lr,
                  config.vae_kl_weight, generator, progress=step)
    train_latents = model.encode_images(train_x, batch_size=256)
    recon_train = model.decode_latents(train_latents, batch_size=256)

    # The detector sees real digits and their VAE reconstructions, the two
    # looks a generated digit can have.
    with _stage(log, "detector")(config.detector_steps, timings) as step:
        detector = train_classifier(torch.cat([(train_x + 1) / 2, recon_train]), torch.cat([train_y, train_y]),
                                    steps=config.detector_steps, seed=config.seed, progress=step)

    with _stage(log, "unet")(config.unet_steps, timings) as step:
        train_denoiser(model, train_latents, train_y, config.unet_steps, config.unet_batch, config.unet_lr,
                       config.prompt_dropout, config.seed, progress=step)

    with _stage(log, "evaluation")(0, timings):
        metrics = evaluate_world(model, detector, test_x, test_y, config)

    model.save(out)
    detector.save(out / CLASSIFIER_DIR)
    timings["total"] = round(time.perf_counter() - start, 2)
    report = {"world": "digits", "key": config.key(), "config": config.to_dict(), "metrics": metrics,
              "timings_s": timings, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                                "platform": platform.platform(), "torch": torch.__version__}}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def evaluate_world(model: DiffusionModel, detector: DigitClassifier, test_x: torch.Tensor, test_y: torch.Tensor,
                   config: DigitsWorldConfig) -> dict:
    """The world's quality bar: detector accuracy on held-out real digits and on
    their VAE reconstructions, and per-digit accuracy of generated samples."""
    real = (detector.predict((test_x + 1) / 2) == test_y).float().mean().item()
    recon_images = model.decode_latents(model.encode_images(test_x, batch_size=256), batch_size=256)
    recon = (detector.predict(recon_images) == test_y).float().mean().item()
    n = config.eval_samples_per_digit
    prompts, labels = [], []
    for digit in range(10):
        phrasings = prompts_for(digit)
        prompts += [phrasings[i % len(phrasings)] for i in range(n)]
        labels += [digit] * n
    seeds = list(range(len(prompts)))  # distinct noise for every sample
    images = model.sample(prompts, seeds, steps=config.eval_steps, guidance_scale=config.guidance_scale,
                          batch_size=250)
    hits = detector.predict(images) == torch.tensor(labels)
    per_digit = {str(d): hits[d * n:(d + 1) * n].float().mean().item() for d in range(10)}
    return {"detector_accuracy_real": round(real, 4), "detector_accuracy_reconstructed": round(recon, 4),
            "sample_accuracy_per_digit": {k: round(v, 4) for k, v in per_digit.items()},
            "sample_accuracy_min": round(min(per_digit.values()), 4),
            "guidance_scale": config.guidance_scale, "sampling_steps": config.eval_steps}
