"""Tiny random pipelines of the four diffusion families (SD 1.x, SDXL, SD3, Flux), built fully offline.

Every pipeline uses the real diffusers/transformers classes of its family with toy sizes (32-wide layers,
1-2 blocks, 32x32-pixel images), so loading, encoding prompts and sampling take the same code paths as the
full-size models. Tokenizers are built without the network:

* CLIP: a truncated copy of the shipped CLIP BPE (the 256 byte symbols, their ``</w>`` forms, the first
  :data:`CLIP_MERGES` merges and the two special tokens), ids ordered exactly as in the real CLIP vocabulary.
* T5: a small Unigram model over a fixed word list plus single characters, ``<pad>``=0, ``</s>``=1, ``<unk>``=2.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import (  # type: ignore[attr-defined]  # T5TokenizerFast: transformers 5 keeps it as an alias
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from erasekit.world.toy import tokenizer_dir

FAMILIES = ("sd", "sdxl", "sd3", "flux")
PIPELINES: dict[str, type] = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}
WIDTH = 32  # hidden size of every text encoder and denoiser
T5_WIDTH = 64  # = 2 x WIDTH, so SD3's concatenated CLIP embeddings pad (not truncate) to the T5 width
CLIP_MERGES = 510  # BPE merges kept from the real CLIP list: 512 + 510 + 2 = 1024 tokens
IMAGE_SIZE = 32  # pixels; every VAE here downsamples 2x, so latents are 16x16

T5_WORDS = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "for", "is", "are", "this",
    "that", "it", "its", "image", "photo", "picture", "painting", "drawing", "sketch", "render", "portrait",
    "landscape", "style", "art", "artwork", "illustration", "cartoon", "anime", "realistic", "red", "green", "blue",
    "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey", "gold", "silver", "dark",
    "light", "bright", "circle", "square", "triangle", "star", "heart", "line", "dot", "shape", "ring", "cross",
    "big", "small", "large", "tiny", "tall", "short", "round", "cat", "cats", "dog", "dogs", "bird", "fish",
    "horse", "cow", "car", "truck", "bus", "train", "plane", "boat", "house", "tree", "flower", "sun", "moon",
    "sky", "man", "woman", "person", "people", "child", "boy", "girl", "face", "hand", "city", "street", "road",
    "river", "sea", "beach", "mountain", "forest", "snow", "rain", "fire", "water", "night", "day", "van", "gogh",
    "picasso", "monet", "nude", "naked", "church", "tower", "bridge", "garden",
)

M = TypeVar("M")


def _seeded(seed: int, make: Callable[[], M]) -> M:
    """Build one model right after seeding torch, so its weights depend only on `seed`."""
    torch.manual_seed(seed)
    return make()


def clip_tokenizer(merges: int = CLIP_MERGES) -> CLIPTokenizer:
    """A small CLIP BPE tokenizer: the real CLIP vocabulary cut after `merges` merges (ids as in CLIP)."""
    full = json.loads((tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    keep = 512 + merges
    vocab = {tok: i for tok, i in full.items() if i < keep}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = keep, keep + 1
    lines = (tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").split("\n")[1 : 1 + merges]
    pairs = [tuple(line.split()) for line in lines]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)  # type: ignore[arg-type]  # merge pairs, as the tokenizer takes them


def t5_tokenizer() -> T5TokenizerFast:
    """A small Unigram T5 tokenizer (whole words from :data:`T5_WORDS`, single characters as fallback)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -5.0) for w in dict.fromkeys(T5_WORDS)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -10.0) for c in chars] + [("\u2581" + c, -10.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(tok: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text config whose vocabulary and special ids match `tok`."""
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=WIDTH, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _t5_encoder(tok: T5TokenizerFast, seed: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style (gated-gelu) encoder over `tok`'s vocabulary."""
    cfg = T5Config(  # type: ignore[call-arg]  # fields T5Config takes through **kwargs
        vocab_size=len(tok), d_model=T5_WIDTH, d_kv=16, d_ff=2 * T5_WIDTH, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return _seeded(seed, lambda: T5EncoderModel(cfg))


def _vae(seed: int, latent_channels: int, **latent: float | None) -> AutoencoderKL:
    """A two-level AutoencoderKL (2x downsampling), 32x32x3 pixels <-> 16x16 latents."""
    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=IMAGE_SIZE, **latent,
    ))


def _sd_scheduler_kwargs() -> dict[str, object]:
    """SD 1.x / SDXL's training schedule: 1000 scaled-linear betas 0.00085..0.012, steps offset 1."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1}


def _build_sd(seed: int) -> Any:
    """Tiny StableDiffusionPipeline."""
    tok = clip_tokenizer()
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(WIDTH // 2, WIDTH),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH, attention_head_dim=4,
        norm_num_groups=8,
    ))
    text = _seeded(seed, lambda: CLIPTextModel(_clip_config(tok)))
    sched = DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=_vae(seed, 4), text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl(seed: int) -> Any:
    """Tiny StableDiffusionXLPipeline (two CLIP towers, text_time added conditioning)."""
    tok = clip_tokenizer()
    time_dim = 8
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(WIDTH // 2, WIDTH),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 1), cross_attention_dim=2 * WIDTH, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + WIDTH,  # 6 size/crop ids + pooled text_2
    ))
    text = _seeded(seed, lambda: CLIPTextModel(_clip_config(tok)))
    text_2 = _seeded(seed, lambda: CLIPTextModelWithProjection(_clip_config(tok)))
    sched = EulerDiscreteScheduler(**_sd_scheduler_kwargs(), timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(seed, 4, scaling_factor=0.13025), text_encoder=text, text_encoder_2=text_2,
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched, add_watermarker=False,
    )


def _build_sd3(seed: int) -> Any:
    """Tiny StableDiffusion3Pipeline (MMDiT, two CLIP towers + T5, 16-channel latents)."""
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * WIDTH, pos_embed_max_size=16,
    ))
    text = _seeded(seed, lambda: CLIPTextModelWithProjection(_clip_config(tok)))
    text_2 = _seeded(seed, lambda: CLIPTextModelWithProjection(_clip_config(tok)))
    vae = _vae(seed, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text, tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok,
        text_encoder_3=_t5_encoder(t5_tok, seed), tokenizer_3=t5_tok,
    )


def _build_flux(seed: int) -> Any:
    """Tiny FluxPipeline (double + single stream blocks, CLIP pooled + T5, packed 16-channel latents)."""
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=WIDTH,
        axes_dims_rope=(4, 6, 6),
    ))
    text = _seeded(seed, lambda: CLIPTextModel(_clip_config(tok)))
    vae = _vae(seed, 16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok,
        text_encoder_2=_t5_encoder(t5_tok, seed), tokenizer_2=t5_tok, transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "sd": _build_sd, "sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux,
}


def tiny_pipeline(family: str, seed: int = 0) -> Any:
    """Build a tiny random pipeline of `family` in memory (not saved), every module in eval mode."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    pipe = _BUILDERS[family](seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: no dropout
    return pipe


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoising network (UNet for SD/SDXL, transformer for SD3/Flux)."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def build_tiny(family: str, folder: Path, seed: int = 0) -> Path:
    """Build a tiny random diffusers pipeline of `family`, save it with save_pretrained to `folder`, return folder."""
    folder = Path(folder)
    tiny_pipeline(family, seed).save_pretrained(folder)
    return folder
