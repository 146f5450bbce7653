"""Build a small but real StableDiffusionPipeline (or SDXL pipeline) from scratch, offline.

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


def _text_encoder(tokenizer, config: TinyPipelineConfig, width: int, projection: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    settings = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 4,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection or width)
    return CLIPTextModelWithProjection(settings) if projection else CLIPTextModel(settings)


def _vae_unet_scheduler(config: TinyPipelineConfig, **unet_extra):
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

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
        norm_num_groups=config.norm_groups, **unet_extra)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler = DDIMScheduler(**schedule)
    DDPMScheduler.from_config(scheduler.config)  # fail early if the two disagree
    return vae, unet, scheduler


def build_pipeline(config: TinyPipelineConfig, words: list[str], seed: int = 0):
    """A randomly initialised StableDiffusionPipeline of the given sizes."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, config.max_length)
    text_encoder = _text_encoder(tokenizer, config, config.text_width)
    vae, unet, scheduler = _vae_unet_scheduler(config)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl_pipeline(config: TinyPipelineConfig, words: list[str], seed: int = 0, time_embed_dim: int = 8,
                        width_2: int | None = None):
    """A randomly initialised StableDiffusionXLPipeline: SDXL's structure at tiny sizes (two text
    encoders whose penultimate hidden states are concatenated, the second one's projected pooled
    output and six size/crop time ids as added conditioning). The second encoder's width: `width_2`,
    else twice the first's (SDXL: 768 and 1280)."""
    import dataclasses

    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(words, config.max_length), build_tokenizer(words, config.max_length)
    width_2 = width_2 or 2 * config.text_width
    text_encoder = _text_encoder(tokenizer, config, config.text_width)
    text_encoder_2 = _text_encoder(tokenizer_2, config, width_2, projection=width_2)
    unet_config = dataclasses.replace(config, text_width=config.text_width + width_2)  # the UNet sees both
    vae, unet, scheduler = _vae_unet_scheduler(
        unet_config, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + width_2)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
