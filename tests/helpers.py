"""Builders shared by the tests: concept data from random latents with real
prompt embeddings, so no image has to be generated; stand-in detectors; checks
of command-line results."""

from __future__ import annotations

import sys

import torch

from metaunlearn import DiffusionModel
from metaunlearn.data import ConceptData, RoleData
from metaunlearn.metrics import Detector
from metaunlearn.registry import DETECTORS

FORGET, RELATED, UNRELATED = "a photo of the digit eight", "the digit three", "a dog"


def role(model: DiffusionModel, name: str, prompts: list[str], n: int, seed: int) -> RoleData:
    g = torch.Generator().manual_seed(seed)
    return RoleData(name, torch.randn(n, *model.latent_shape, generator=g), torch.arange(n) % len(prompts),
                    prompts, model.encode_prompts(prompts), [f"random:{seed}:{i}" for i in range(n)])


def concept_data(model: DiffusionModel, split: str = "train") -> ConceptData:
    return ConceptData(role(model, "forget", [FORGET, "a photo of the digit one"], 4, 0),
                       role(model, "related", [RELATED], 3, 1), role(model, "unrelated", [UNRELATED], 3, 2), split)


@DETECTORS.register("bright", help="test stand-in: every prompt judged, bright = present")
class BrightDetector(Detector):
    """A stand-in for models with no detector: judges every prompt, and calls the
    concept present when an image is brighter than mid-gray."""

    def concept_of(self, prompt, role, forget_concepts):
        return "bright"

    def present(self, images, concept):
        return images.mean(dim=(1, 2, 3)) > 0.5


@DETECTORS.register("coin", help="test stand-in: a verdict any change of an image flips")
class CoinDetector(BrightDetector):
    """Judges every prompt with a pseudo-random but deterministic verdict per image (a bit of its
    pixel sum), so rates differ between models and seeds where a tiny model's brightness does not."""

    def present(self, images, concept):
        return (images.double().sum(dim=(1, 2, 3)) * 1e4).floor().remainder(2) == 1


@DETECTORS.register("coin-forget", help="test stand-in: 'coin' on the forget role only, as NudeNet judges")
class CoinForgetDetector(CoinDetector):
    judges = "forget"

    def concept_of(self, prompt, role, forget_concepts):
        return "bright" if role == self.judges else None


@DETECTORS.register("coin-related", help="test stand-in: 'coin' on the related role only (no forget rate)")
class CoinRelatedDetector(CoinForgetDetector):
    judges = "related"


def console_script() -> list[str]:
    """The installed `metaunlearn` command (the venv's console script, not a Python -c stand-in)."""
    from pathlib import Path

    script = Path(sys.executable).with_name("metaunlearn")
    assert script.is_file(), f"no console script at {script}: install the package (pip install -e .)"
    return [str(script)]


def clean_exit(result, code: int = 0):
    """A CliRunner result that ended through sys.exit with `code`. An uncaught exception also
    exits 1 under CliRunner, but lands in result.exception and never in the output, so
    '"Traceback" not in result.output' cannot catch it: this can."""
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert result.exit_code == code, result.output
    return result


def one_line_error(result) -> str:
    """Bad input: exit status 1, no uncaught exception, and one 'error: ' line as the whole output."""
    clean_exit(result, 1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.stderr.strip() == lines[0]  # on stderr
    return lines[0]


def build_tiny_clip(folder, words=None, seed: int = 0):
    """A randomly initialised CLIP (model, tokenizer, image processor) saved to `folder`: what
    `metrics.hf_models.load_clip` reads from a hub id, offline and in a fraction of a second."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from metaunlearn.worlds.pipeline import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words or ["a", "photo", "of", "the", "digit", "eight", "nude", "dog", "painting"],
                                max_length=16)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_classifier(folder, labels: list[str], seed: int = 0):
    """A randomly initialised ViT image classifier with the given labels, saved to `folder`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    model = ViTForImageClassification(config)
    # transformers' initialisation (std 0.02, and it differs between versions) leaves the class token's
    # output nearly the same for every image, so one label can win them all (transformers 5.17 did). Our
    # own draw, the same on any version: weights at unit gain (1/sqrt(fan in)), and a zero class token and
    # position embedding, so the class token's output is what it attends to in the image, nothing shared
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() >= 2 and "projection" in name or p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:  # biases, the class token, the position embedding
                p.zero_()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
