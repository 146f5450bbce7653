"""`metaunlearn demo`: what the built-in digits world can do, end to end on a CPU."""

from __future__ import annotations

from pathlib import Path


from .images import grid, save_png
from .model import DiffusionModel
from .worlds.digits import DigitsWorldConfig, get_world, load_detector
from .worlds.digits_data import DIGIT_WORDS, prompts_for


def run_demo(out: Path, config: DigitsWorldConfig | None = None, samples_per_digit: int = 8) -> Path:
    config = config or DigitsWorldConfig()
    world = get_world(config)
    model = DiffusionModel.load(world)
    detector = load_detector(world)
    prompts = [prompts_for(d)[0] for d in range(10) for _ in range(samples_per_digit)]
    seeds = [1000 + i for i in range(len(prompts))]
    images = model.sample(prompts, seeds, steps=config.eval_steps, guidance_scale=config.guidance_scale)
    predicted = detector.predict(images).view(10, samples_per_digit)
    path = save_png(grid(images, nrow=samples_per_digit, scale=3), Path(out) / "samples.png")
    print(f"digits world: {world}")
    for digit in range(10):
        hits = (predicted[digit] == digit).float().mean().item()
        print(f"  '{prompts[digit * samples_per_digit]}': {hits:.0%} classified as {DIGIT_WORDS[digit]}")
    print(f"sample grid (one row per digit): {path}")
    return path
