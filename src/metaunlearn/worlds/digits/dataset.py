"""The digits world's data: scikit-learn's 8x8 digits as 32x32 RGB images,
fixed splits, and prompts naming each digit in several phrasings.

Splits (stratified, fixed seed, shared by every stage so they never overlap):
  train  - pretrains the world (VAE, UNet, text encoder, detector); unlearning
           and meta data for digit-class roles come from here;
  test   - held out: measures the detector and the world's quality;
  attack - held out from everything: the relearning attacker's images.
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = ("train", "test", "attack")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)

# Several phrasings per digit, mixing the word and the numeral, so that prompts of
# different digits differ in more than one token out of many.
TEMPLATES = [
    "a photo of the digit {word}",
    "a handwritten {num}",
    "the number {word}",
    "an image of the numeral {num}",
    "a drawing of a {word}",
    "{word}",
    "a written {word} digit",
    "digit {num}",
]


def prompts_for(digit: int) -> list[str]:
    return [t.format(word=DIGIT_WORDS[digit], num=digit) for t in TEMPLATES]


def vocabulary() -> list[str]:
    words = set(DIGIT_WORDS)
    for template in TEMPLATES:
        words.update(w for w in template.replace("{word}", "").replace("{num}", "").split())
    return sorted(words)


def digit_of_word(name: str) -> int:
    """'eight' or '8' -> 8; a clear error otherwise."""
    name = str(name).strip().lower()
    if name in DIGIT_WORDS:
        return DIGIT_WORDS.index(name)
    if name.isdigit() and 0 <= int(name) <= 9:
        return int(name)
    raise ValueError(f"'{name}' is not a digit; use one of {', '.join(DIGIT_WORDS)} or 0-9")


def to_images(raw: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(N, 8, 8) digits in 0..16 -> (N, 3, size, size) RGB in [-1, 1]."""
    x = raw.float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()


@lru_cache(maxsize=4)
def _split_indices(seed: int) -> dict[str, list[int]]:
    from sklearn.datasets import load_digits

    labels = load_digits().target.tolist()
    rng = random.Random(seed)
    out = {name: [] for name in SPLITS}
    for digit in range(10):
        idx = [i for i, y in enumerate(labels) if y == digit]
        rng.shuffle(idx)
        n_train = round(len(idx) * SPLIT_FRACTIONS[0])
        n_test = round(len(idx) * SPLIT_FRACTIONS[1])
        out["train"] += idx[:n_train]
        out["test"] += idx[n_train:n_train + n_test]
        out["attack"] += idx[n_train + n_test:]
    return {k: sorted(v) for k, v in out.items()}


def split_indices(split: str, digits: list[int] | None = None, seed: int = 0) -> list[int]:
    """Dataset indices of one split (optionally only some digits), in load_split's order."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"unknown digits split '{split}'; choose from {', '.join(SPLITS)}")
    idx = _split_indices(seed)[split]
    if digits is None:
        return idx
    target, wanted = load_digits().target, set(digits)
    return [i for i in idx if int(target[i]) in wanted]


def load_split(split: str, size: int = 32, digits: list[int] | None = None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) in [-1, 1] and labels (N,) of one split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = split_indices(split, digits, seed)
    raw = torch.tensor(data.images[idx])
    return to_images(raw, size), torch.tensor(data.target[idx], dtype=torch.long)
