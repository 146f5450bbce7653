"""FID and KID per role (registered as metric 'fid'): how far a model's samples
of a role's prompts are, as a distribution, from a reference set, in the
feature space of a pluggable extractor (`features.py`). The maths is
torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), fed with
features we extract and cache, so a reference set is embedded once per study.

References, per role:
- 'original': the original model's samples of the same prompts and seeds
  (the utility cost of unlearning and of an attack; 0 for the original);
- 'world': a built-in world's real held-out images of the role's classes
  (the digits world's test split: real digits no stage trains on);
- a folder of real images (COCO val2014 for COCO-style FID), center-cropped
  and resized to the samples' resolution, at most `reference_limit` of them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar, Literal, Union

import torch
from pydantic import Field

from ..config import ROLES, PluginSection
from ..errors import MetaunlearnError
from ..imagefolder import signature
from ..layout import digest
from ..registry import FEATURES, METRICS, Registry
from .base import Context, Metric, Result, Samples, Value, check_installed
from .features import Features

Role = Literal["forget", "related", "unrelated"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FidOptions(PluginSection):
    registry: ClassVar[Registry] = FEATURES
    selector: ClassVar[str] = "features"
    special: ClassVar[tuple[str, ...]] = ("auto",)

    features: str = Field("auto", description=(
        "Registered feature extractor: inception, clip, or a world's own; 'auto': the built-in world's, else "
        "inception."))
    reference: Union[str, dict[Role, str]] = Field("auto", description=(
        "What samples are compared with, for every role or per role: 'original' (the original model's samples "
        "of the same prompts), 'world' (a built-in world's real held-out images of the role's classes), or a "
        "folder of real images (e.g. COCO val2014); 'auto': 'world' in a built-in world, else 'original'. On "
        "the forget role a higher FID is better (further from the concept), except against one folder for "
        "every role: generic images, where it measures image quality."))
    roles: list[Role] = Field(list(ROLES), min_length=1, description="Roles whose samples are measured.")
    kid: bool = Field(True, description="Also report KID (unbiased for small sample counts, unlike FID).")
    kid_subset_size: int = Field(1000, gt=1, description="KID subset size (capped at the smaller sample count).")
    reference_limit: int = Field(5000, gt=1, description="Most images read from a reference folder.")


def features_name(options: FidOptions, world) -> str:
    """The configured feature extractor; 'auto' is the built-in world's own, else Inception."""
    if options.features != "auto":
        return options.features
    return (world.default_features if world is not None else "") or "inception"


@METRICS.register("fid", FidOptions, help="FID and KID per role against a reference set (utility)")
class Fid(Metric):
    def __init__(self, options: FidOptions, context: Context):
        super().__init__(options, context)
        self.features_name = name = features_name(options, context.world)
        self.features: Features = FEATURES.get(name, "evaluation.fid.features").impl(options.options(name), context)
        self.values = [v for role in options.roles for v in (
            Value(f"fid_{role}", f"FID {role}", role, higher_is_better=farther_is_better(options, role),
                  fraction=False, group="utility"),
            *([Value(f"kid_{role}", f"KID {role}", role, higher_is_better=farther_is_better(options, role),
                     fraction=False, group="utility")]
              if options.kid else []))]
        self._references: dict[str, torch.Tensor] = {}
        self._folders: dict[str, str] = {}  # a reference folder's signature, taken once per evaluator

    def reference_of(self, role: str) -> str:
        return _reference(self.options, role, self.context.world)

    @classmethod
    def check(cls, options: FidOptions, config, world) -> None:
        for role in options.roles:
            ref = _reference(options, role, world)
            if ref == "world":
                _world_classes(world, getattr(config.concepts, role).classes, role)
            elif ref != "original":
                _image_paths(ref, limit=2)
        check_installed(FEATURES.get(features_name(options, world), "evaluation.fid.features").impl)

    def compute(self, samples: Samples, model=None) -> Result:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        values, details = {v.key: None for v in self.values}, {}
        for role in self.options.roles:
            fake = self.features(samples.of_role(role))
            if len(fake) < 2:
                continue  # the study has no (or one) sample of this role
            real = self.reference_features(role, samples)
            feature = _Given(fake.shape[1])
            fid = FrechetInceptionDistance(feature=feature).double()
            fid.update(real, real=True)
            fid.update(fake, real=False)
            values[f"fid_{role}"] = float(fid.compute())
            details[role] = {"reference": self.reference_of(role), "reference_n": len(real), "samples_n": len(fake)}
            if self.options.kid:
                size = min(self.options.kid_subset_size, len(real), len(fake))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # its notice that it keeps every feature: we hand it features
                    kid = KernelInceptionDistance(feature=feature, subset_size=size)
                kid.update(real, real=True)
                kid.update(fake, real=False)
                with torch.random.fork_rng(devices=[]):  # its subsets are drawn at random: the same every time
                    torch.manual_seed(0)
                    mean, std = kid.compute()
                values[f"kid_{role}"] = float(mean)
                details[role].update(kid_std=float(std), kid_subset_size=size)
        conventions = {"features": self.features_name, **self.features.conventions(),
                       "reference": {r: self.reference_of(r) for r in self.options.roles}}
        return Result(values, {"conventions": conventions, "roles": details})

    # ------------------------------------------------------------ references
    def reference_features(self, role: str, samples: Samples) -> torch.Tensor:
        """The reference set's features for a role: from memory, else the study's cache, else computed."""
        ref, key = self.reference_of(role), self.reference_key(role, samples)
        if key in self._references:
            return self._references[key]
        cache = Path(self.context.cache_dir) / f"reference-{key}.safetensors" if self.context.cache_dir else None
        if cache is not None and cache.is_file():
            from safetensors.torch import load_file

            features = load_file(cache)["features"]
        else:
            features = self.features(self.reference_images(ref, role, samples))
            if len(features) < 2:
                raise MetaunlearnError(f"the FID reference '{ref}' of role {role} has {len(features)} image(s); "
                                       "it needs at least 2")
            if cache is not None:
                from safetensors.torch import save_file

                from ..layout import atomic_file

                with atomic_file(cache) as tmp:
                    save_file({"features": features.contiguous()}, str(tmp))
        self._references[key] = features
        return features

    def reference_key(self, role: str, samples: Samples) -> str:
        """What a role's reference features depend on: the cache file's name. The study's run folder keeps
        its name when a --set changes the concepts, the world or a folder's images, so all of them count."""
        from ..metrics.evaluate import settings_key

        ref = self.reference_of(role)
        what = {"ref": ref, "role": role, "features": self.features_name, "conv": self.features.conventions(),
                "limit": self.options.reference_limit}
        if ref == "original":  # the original's samples depend on the evaluation prompts, seeds and settings
            what.update(settings=settings_key(self.context.config),
                        entries=[e for e in samples.entries if e[0] == role],
                        seeds=samples.seeds)
        elif ref == "world":  # which world (its folder is named by its config's hash), which classes, what size
            classes = getattr(self.context.config.concepts, role).classes
            _world_classes(self.context.world, classes, role)
            what.update(world=str(self.context.world.folder(log=lambda *_: None)), size=samples.images.shape[-1],
                        classes=sorted(classes))
        else:  # a folder: its files count, as an image folder's do for a role's data
            if ref not in self._folders:
                self._folders[ref] = signature(Path(ref).expanduser())
            what.update(folder=self._folders[ref], size=samples.images.shape[-1])
        return digest(what)

    def reference_images(self, ref: str, role: str, samples: Samples) -> torch.Tensor:
        if ref == "original":
            source = samples if samples.original else samples.evaluator.original_samples()
            return source.of_role(role)
        size = samples.images.shape[-1]
        if ref == "world":
            world, classes = self.context.world, getattr(self.context.config.concepts, role).classes
            _world_classes(world, classes, role)
            return world.reference_images(classes, size)
        return folder_images(ref, size, self.options.reference_limit)


def farther_is_better(options: FidOptions, role: str) -> bool:
    """Whether a higher FID means a better model. The forget role's reference shows the concept (the original's
    samples, the world's real images of it, or a folder given for that role), so further from it is the goal
    and relearning brings it down; one folder for every role (COCO) is generic images, where lower is better
    for the forget role too (image quality)."""
    given = options.reference
    if role != "forget":
        return False
    mine = given.get("forget", "auto") if isinstance(given, dict) else given
    others = {given.get(r, "auto") for r in ROLES if r != "forget"} if isinstance(given, dict) else {given}
    return mine in ("auto", "original", "world") or mine not in others  # a folder of the forget role's own


def _reference(options: FidOptions, role: str, world) -> str:
    given = options.reference
    ref = given.get(role, "auto") if isinstance(given, dict) else given
    return ("world" if world is not None else "original") if ref == "auto" else ref


def _world_classes(world, classes: list[str], role: str) -> None:
    if world is None or not classes:
        raise MetaunlearnError(f"FID reference 'world' for role {role} needs a built-in world and "
                               f"concepts.{role}.classes")


def _image_paths(folder: str, limit: int) -> list[Path]:
    """The first `limit` images of a reference folder (recursively, sorted by path); at least 2."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MetaunlearnError(f"FID reference folder '{folder}' does not exist; give a folder of real images "
                               "(e.g. COCO val2014), 'original' or 'world'")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(paths) < 2:
        raise MetaunlearnError(f"FID reference folder '{folder}' has {len(paths)} image(s); it needs at least 2")
    return paths


class _Given(torch.nn.Module):
    """The 'feature extractor' torchmetrics sees: the features are already extracted."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def folder_images(folder: str, size: int, limit: int) -> torch.Tensor:
    """Up to `limit` images of a folder (recursively, sorted by path), center-cropped to a square
    and resized to size x size, in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    images = []
    paths = _image_paths(folder, limit)
    for path in paths:
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError):
            raise MetaunlearnError(f"FID reference image '{path}' cannot be read") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(images).permute(0, 3, 1, 2).float() / 255
