"""Architecture of the toy Stable Diffusion pipeline: real diffusers/transformers classes, small sizes.

The pipeline is a genuine ``StableDiffusionPipeline`` (UNet2DConditionModel with cross-attention,
CLIPTextModel on the real CLIP BPE tokenizer, AutoencoderKL, DDIM) so every code path that SD 1.4
takes is taken here too; only the sizes differ.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_WIDTH = 128
LATENT_CHANNELS = 4


def tokenizer_dir() -> Path:
    """Folder holding the shipped CLIP BPE tokenizer (vocab.json, merges.txt)."""
    return Path(str(resources.files("erasekit.world").joinpath("assets/tokenizer")))


def build_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (49,408 tokens), built offline from the shipped BPE files."""
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir()), model_max_length=77)


def text_config() -> CLIPTextConfig:
    """A 2-layer, 128-wide CLIP text encoder over the full CLIP vocabulary (the toy CLIP's text tower)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def build_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A freshly initialised text encoder of :func:`text_config`."""
    torch.manual_seed(seed)
    return CLIPTextModel(text_config())


def build_unet(seed: int = 0, sample_size: int = 16) -> UNet2DConditionModel:
    """A 3.2 M-parameter SD-shaped UNet: cross-attention in the two upper levels and the middle, as in SD 1.x.

    Widths 32/64/128 keep 64 images x 25 DDIM steps with CFG near the 10 s bar on 2 cores.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_vae(seed: int = 0, image_size: int = 32) -> AutoencoderKL:
    """A small AutoencoderKL with one 2x downsampling: 32x32x3 pixels <-> 16x16x4 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=image_size,
    )


def build_scheduler() -> DDIMScheduler:
    """SD 1.4's DDIM schedule (scaled-linear betas 0.00085..0.012, 1000 steps, offset 1)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
