"""Build a small but real StableDiffusionPipeline from scratch, offline.

Nothing is downloaded: the CLIP tokenizer's vocabulary and BPE merges are made
from a word list, and every component is randomly initialised from a config.
The digits world trains one of these; the tests use untrained ones.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(words: list[str], max_length: int = 16):
    """A CLIPTokenizer whose whole words are single tokens.

    Every lowercase letter, digit and punctuation mark is in the vocabulary (with
    and without CLIP's end-of-word marker), so any text tokenizes; each listed
    word additionally gets a chain of merges that assembles it into one token.
    """
    from transformers import CLIPTokenizer

    symbols = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                         bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


@dataclass
class TinyPipelineConfig:
    """Sizes of a tiny SD-1.x pipeline. Defaults: a few hundred thousand
    parameters, for tests; the digits world uses larger ones."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32)  # len-1 halvings: 32px -> 8x8 latents
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    # attention only below the highest resolution: it costs ~10x there
    unet_attention: tuple[bool, ...] = (False, True)
    layers_per_block: int = 1
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 16
    attention_head_dim: int = 8
    norm_groups: int = 8

    def __post_init__(self):
        for name in ("vae_channels", "unet_channels", "unet_attention"):
            setattr(self, name, tuple(getattr(self, name)))
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError("unet_attention needs one flag per UNet level")

    def to_dict(self) -> dict:
        return asdict(self)


def build_pipeline(config: TinyPipelineConfig, words: list[str], seed: int = 0):
    """A randomly initialised StableDiffusionPipeline of the given sizes."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, config.max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=config.text_width * 4,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=config.norm_groups,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=config.image_size)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_attention))
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (levels - 1), in_channels=config.latent_channels,
        out_channels=config.latent_channels, block_out_channels=config.unet_channels,
        down_block_types=down, up_block_types=up, layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width, attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_groups)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler = DDIMScheduler(**schedule)
    DDPMScheduler.from_config(scheduler.config)  # fail early if the two disagree
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
