"""The built-in digits world: a tiny, real StableDiffusionPipeline trained on
scikit-learn's digits, its dataset splits, prompts, and its concept detector
(a digit classifier). Registered as world 'digits' and detector 'digits'.

Heavy modules (the build, torch models) are imported only when used: reading
a study config that names this world must stay cheap.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from ...registry import WORLDS, Options
from .. import WORLD_FILE, World, world_report
from .detector import CLASSIFIER_DIR  # importing it registers the 'digits' detector
from .dataset import DIGIT_WORDS, digit_of_word, prompts_for


class DigitsOptions(Options):
    preset: Literal["default", "reduced", "wide"] = Field("default", description=(
        "'default': the world the measurements use (about 4 CPU minutes to build, cached); 'reduced': builds "
        "in seconds, for smoke tests; its quality is meaningless; 'wide': the default with twice the UNet's "
        "channels (about 4x its weights), to see whether a result depends on the UNet's size."))


@WORLDS.register("digits", DigitsOptions, help="scikit-learn's digits, 32x32, 10 classes")
class DigitsWorld(World):
    name = "digits"
    default_detector = "digits"
    default_features = "digits"

    def build_config(self):
        from .build import DigitsWorldConfig

        return {"reduced": DigitsWorldConfig.reduced, "wide": DigitsWorldConfig.wide}.get(
            self.options.preset, DigitsWorldConfig)()

    carried = (CLASSIFIER_DIR,)  # the digit classifier, 0.75 MB

    def folder(self, log=print, rebuild: bool = False) -> Path:
        from .build import get_world

        if self._folder is not None and not rebuild:
            return self._folder
        return get_world(self.build_config(), rebuild=rebuild, log=log)

    def describe(self, folder: Path) -> str:
        report = world_report(folder) or {}
        m = report.get("metrics", {})
        if not m:
            return f"digits world: {folder} (no world.json)"
        per_digit = "  ".join(f"{d}:{v:.0%}" for d, v in m["sample_accuracy_per_digit"].items())
        return "\n".join([
            f"digits world: {folder}",
            f"  detector accuracy, held-out real digits:     {m['detector_accuracy_real']:.1%}",
            f"  detector accuracy, VAE reconstructions:      {m['detector_accuracy_reconstructed']:.1%}",
            f"  samples classified as their digit (g={m['guidance_scale']}): {per_digit}",
            f"  build time: {report['timings_s']['total']:.0f} s  ({folder / WORLD_FILE})"])

    def is_built(self) -> bool:
        from .build import world_folder

        folder = self._folder if self._folder is not None else world_folder(self.build_config())
        return (folder / WORLD_FILE).is_file()

    def split_seed(self) -> int:
        """The seed the world's dataset splits were made with (they never overlap)."""
        return int((world_report(self.folder()) or {}).get("config", {}).get("seed", 0))

    def normalise_classes(self, classes: list[str]) -> list[str]:
        words = []
        for name in classes:
            try:
                words.append(DIGIT_WORDS[digit_of_word(name)])
            except ValueError:
                raise ValueError(f"has '{name}', not a digit; use zero..nine or 0..9") from None
        return words

    def class_prompts(self, name: str) -> list[str]:
        return prompts_for(digit_of_word(name))

    def reference_images(self, classes, size):
        from .dataset import load_split

        images, _ = load_split("test", size=size, digits=[digit_of_word(c) for c in classes], seed=self.split_seed())
        return (images + 1) / 2

    def class_feed(self, role, split, model, batch):
        from .dataset import load_split, split_indices

        digits = [digit_of_word(w) for w in role.classes]
        seed = self.split_seed()
        images, labels = load_split(split, size=model.image_size, digits=digits, seed=seed)
        indices = split_indices(split, digits, seed)
        seen = dict.fromkeys(digits, 0)
        captions = []
        for label in labels.tolist():  # cycle the role's prompts naming this digit, else its phrasings
            options = [p for p in role.all_prompts() if _names_digit(p, label)] or prompts_for(label)
            captions.append(options[seen[label] % len(options)])
            seen[label] += 1
        chunks = ((images[i:i + batch], captions[i:i + batch],
                   [f"digits:{split}:{j}" for j in indices[i:i + batch]]) for i in range(0, len(images), batch))
        return len(images), chunks


def _names_digit(prompt: str, digit: int) -> bool:
    return re.search(rf"\b({DIGIT_WORDS[digit]}|{digit})\b", prompt.lower()) is not None
