"""Loading the judges of evaluation from Hugging Face: CLIP (for CLIP score,
zero-shot detection and CLIP features) and image classifiers, from a hub id
or a local folder, each once per process, with one-line errors."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import MetaunlearnError
from ..model import quiet_io

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # ViT-L/14: the CLIP of the literature's CLIP scores


def _where(source: str) -> str:
    if Path(source).expanduser().is_dir():
        return f"folder '{source}'"
    offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return f"'{source}' (a hub id, or a folder that does not exist){offline}"


def _path(source: str) -> str:
    folder = Path(source).expanduser()
    return str(folder) if folder.is_dir() else source


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load(kind: str, source: str, device: str, model_cls, processor_cls):
    path = _path(source)
    try:
        with quiet_io():
            model, processor = model_cls.from_pretrained(path), processor_cls.from_pretrained(path)
    except Exception as err:  # hub and file errors come in many types; all mean "cannot load it"
        raise MetaunlearnError(f"cannot load {kind} from {_where(source)}: {_first_line(err)}") from None
    return model.to(device).eval().requires_grad_(False), processor


@functools.lru_cache(maxsize=4)
def load_clip(source: str, device: str = "cpu"):
    """(CLIPModel in eval mode on `device`, CLIPProcessor) from a hub id or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    return _load("a CLIP model", source, device, CLIPModel, CLIPProcessor)


@functools.lru_cache(maxsize=4)
def load_image_classifier(source: str, device: str = "cpu"):
    """(AutoModelForImageClassification in eval mode on `device`, its image processor)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return _load("an image classifier", source, device, AutoModelForImageClassification, AutoImageProcessor)


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> uint8 tensors: what image processors expect (they rescale by 1/255)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to("cpu").byte()


def _tensor(out):
    # transformers 4 returns the projected embeddings; 5 an output whose pooler_output holds them
    return out if hasattr(out, "norm") else out.pooler_output


class ClipEmbedder:
    """CLIP's projected image and text embeddings as plain tensors, whatever the transformers
    version returns, with prompts truncated by the tokenizer (keeping the end-of-text token that
    CLIP pools, where cutting input ids would drop it). It is also the (model, processor) pair
    torchmetrics' CLIPScore takes, so the score's maths stays torchmetrics'."""

    def __init__(self, source: str, device: str = "cpu"):
        self.model, self._processor = load_clip(source, device)
        self.config, self.device = self.model.config, device
        self.max_length = self.config.text_config.max_position_embeddings

    def to(self, device):  # torchmetrics moves "the model" to the images' device
        self.model.to(device)
        self.device = device
        return self

    def __call__(self, text=None, images=None, **kwargs):  # the processor torchmetrics calls
        if text is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self._processor(text=text, images=images, **kwargs)

    def get_image_features(self, pixel_values, **kwargs):
        return _tensor(self.model.get_image_features(pixel_values=pixel_values.to(self.device), **kwargs))

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        return _tensor(self.model.get_text_features(input_ids=input_ids.to(self.device),
                                                    attention_mask=None if attention_mask is None else
                                                    attention_mask.to(self.device), **kwargs))

    def image_embeddings(self, images) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unit-norm embeddings (B, D), float32 on the CPU."""
        import torch

        with torch.no_grad():
            pixels = self(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
            emb = self.get_image_features(pixels).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu()

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        import torch

        with torch.no_grad():
            tokens = self(text=list(texts), return_tensors="pt", padding=True)
            emb = self.get_text_features(tokens["input_ids"], tokens["attention_mask"]).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu()
