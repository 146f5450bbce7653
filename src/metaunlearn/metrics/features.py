"""Image feature extractors for distribution metrics (FID, KID), a plugin kind
(`FEATURES`) so the metric runs offline in tests and on what a study trusts:

- 'inception': the InceptionV3 of FID as torchmetrics and torch-fidelity
  compute it (2048-d pool features; needs `pip install 'metaunlearn[inception]'`
  and its weights, downloaded once or given as a file);
- 'clip': a CLIP image encoder's embeddings (FD on CLIP features, which
  tracks human judgement of generated images better than Inception's);
- a built-in world's own (the digits world: its classifier's penultimate layer).

An extractor maps images (B, 3, H, W) in [0, 1] to features (B, D) on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from ..errors import MetaunlearnError
from ..registry import FEATURES, Options
from .base import device_of
from .hf_models import DEFAULT_CLIP, ClipEmbedder, to_uint8


class Features:
    """Built as `cls(options, context)`; `name` and `conventions()` go into results."""

    batch_size = 64
    requires: tuple[str, ...] = ()  # packages it imports that metaunlearn does not depend on
    install_hint = ""  # what to do when one is missing

    def __init__(self, options: Options, context=None):
        self.options, self.context = options, context

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.extract(images[i:i + self.batch_size]).double().cpu()
                              for i in range(0, len(images), self.batch_size)]) if len(images) else torch.empty(0)

    def conventions(self) -> dict:
        return self.options.model_dump(mode="json")


class InceptionOptions(Options):
    weights: Optional[str] = Field(None, description=(
        "Path of torch-fidelity's pt_inception-2015-12-05 weights; None: downloaded on first use."))


@FEATURES.register("inception", InceptionOptions, help="FID's InceptionV3 (torchmetrics / torch-fidelity), 2048-d")
class InceptionFeatures(Features):
    requires = ("torch_fidelity",)
    install_hint = ("FID's Inception features need torch-fidelity: pip install 'metaunlearn[inception]'; or set "
                    "the fid metric's features to 'clip' or a world's own")

    def __init__(self, options: InceptionOptions, context=None):
        super().__init__(options, context)
        self.device = device_of(context)  # outside the try: a device error is not a weights error
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=options.weights).to(self.device)
        except (ImportError, ModuleNotFoundError):
            raise MetaunlearnError(self.install_hint) from None
        except Exception as err:  # a failed weights download comes in many types
            raise MetaunlearnError(f"cannot load FID's Inception weights ({str(err).splitlines()[0]}); give them as "
                                   "evaluation.fid.inception.weights") from None

    def extract(self, images):
        return self.net(to_uint8(images).to(self.device))  # it resizes to 299 itself, as FID does


class ClipFeatureOptions(Options):
    model: str = Field(DEFAULT_CLIP, description="CLIP model (hub id or folder) whose image embeddings are features.")


@FEATURES.register("clip", ClipFeatureOptions, help="a CLIP image encoder's embeddings")
class ClipFeatures(Features):
    def __init__(self, options: ClipFeatureOptions, context=None):
        super().__init__(options, context)
        self.embedder = ClipEmbedder(options.model, device_of(context))

    def extract(self, images):
        return self.embedder.image_embeddings(images)
