"""The toy Janus: its settings, its architecture (transformers' ``JanusForConditionalGeneration`` at toy sizes), and its VQ maths.

The VQ image tokenizer is trained here the way Janus's (LlamaGen's) is: encoder -> ``quant_conv`` -> codes looked up
in an L2-normalised codebook (both the encoder's vector and the codebook rows are normalised, so the nearest code is
the one of highest cosine) -> ``post_quant_conv`` -> decoder. This is exactly what transformers' own
``JanusVQVAE.decode`` computes from token ids (``get_codebook_entry`` normalises the codebook row), so tokens the
trainer makes decode with transformers' classes to what the trainer saw. transformers' ``JanusVQVAE.encode`` does
not normalise; images are therefore tokenised with :func:`tokenize_images`, never with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError

STAGES = ("data", "vq", "tokens", "lm", "export")
FORMAT = 1  # the layout of a toy-Janus run folder (work/config.json, work/<stage>.ckpt, work/<stage>.done)


@dataclass
class JanusTrainConfig:
    """Sizes and schedules of the toy Janus (`erasekit world janus`); a resumed run must keep the settings of the stages it began.

    Defaults: sized to train in about an hour on 2 CPU cores (timed single-threaded on a busy 2-core machine:
    0.35 s per VQ step of 32 images, 0.39 s per language-model step of 48 sequences; ~1.4 M parameters, ~6 MB).
    """

    seed: int = field(default=0, metadata={"help": "Seed for data, initialisation and training."})
    n_images: int = field(default=30000, metadata={"help": "Rendered training images (the toy world's renders and captions)."})
    grid: int = field(default=8, metadata={"help": "Image tokens per side (grid x grid tokens; 32-pixel images, so 8 means 4x4-pixel patches)."})
    codebook: int = field(default=512, metadata={"help": "VQ codebook entries (image-token vocabulary)."})
    code_dim: int = field(default=8, metadata={"help": "Dimension of a codebook entry (low, as LlamaGen's VQ: better code usage)."})
    vq_channels: int = field(default=32, metadata={"help": "VQ encoder/decoder channels (a multiple of 32: its GroupNorms use 32 groups)."})
    vq_steps: int = field(default=3000, metadata={"help": "VQ autoencoder training steps."})
    vq_batch: int = field(default=32, metadata={"help": "VQ batch size."})
    vq_lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of the VQ autoencoder."})
    commitment: float = field(default=0.25, metadata={"help": "Commitment weight beta of the VQ loss (van den Oord et al. 2017; Janus/LlamaGen 0.25)."})
    width: int = field(default=128, metadata={"help": "Hidden size of the language model (a multiple of 32 and of the heads)."})
    layers: int = field(default=4, metadata={"help": "Language-model layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads of the language model."})
    clip_merges: int = field(default=2000, metadata={"help": "BPE merges kept from the real CLIP tokenizer (fewer: a smaller vocabulary, longer captions)."})
    lm_steps: int = field(default=6000, metadata={"help": "Language-model training steps (next image token cross-entropy)."})
    lm_batch: int = field(default=48, metadata={"help": "Language-model batch size (caption + image-token sequences)."})
    lm_lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of the language model (warm-up, then cosine to a tenth)."})
    cfg_dropout: float = field(default=0.1, metadata={"help": "Probability a caption is replaced by Janus's unconditional pad prompt (for CFG)."})
    checkpoint_every: int = field(default=100, metadata={"help": "Steps between checkpoints."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})


# The first stage each setting shapes: on resume a setting may change only while that stage has not begun.
# checkpoint_every and threads change nothing a stage computes.
STAGE_OF = {
    "seed": "data", "n_images": "data", "grid": "vq", "codebook": "vq", "code_dim": "vq", "vq_channels": "vq",
    "vq_steps": "vq", "vq_batch": "vq", "vq_lr": "vq", "commitment": "vq", "width": "lm", "layers": "lm", "heads": "lm",
    "clip_merges": "lm", "lm_steps": "lm", "lm_batch": "lm", "lm_lr": "lm", "cfg_dropout": "lm",
}


# upper bounds that keep a mistyped size from asking for more memory than a machine has (clip_merges: all of CLIP's)
LIMITS = {"codebook": 65536, "code_dim": 256, "vq_channels": 512, "width": 2048, "layers": 64, "heads": 64, "clip_merges": 48894,
          "vq_steps": 10**7, "vq_batch": 4096, "lm_steps": 10**7, "lm_batch": 4096, "n_images": 10**7, "checkpoint_every": 10**7}


def check_sizes(config: JanusTrainConfig, image_size: int) -> None:
    """Refuse, in one line each, sizes transformers' Janus cannot build at ``image_size`` pixels."""
    from erasekit.checks import SettingError

    side = image_size // config.grid if config.grid > 0 else 0
    if config.grid < 1 or image_size % config.grid or side & (side - 1):
        raise SettingError("grid", f"{{name}} must divide {image_size} into a power-of-two patch (the VQ decoder upsamples by 2 per level), got {config.grid}")
    if config.vq_channels < 32 or config.vq_channels % 32:
        raise SettingError("vq_channels", f"{{name}} must be a positive multiple of 32 (GroupNorm with 32 groups), got {config.vq_channels}")
    if config.heads < 1 or config.width % config.heads or (config.width // config.heads) % 2:
        raise SettingError("width", f"{{name}} must be a multiple of 2 x heads ({config.heads}) for rotary attention, got {config.width}")
    if config.width < 32 or config.width % 32:
        raise SettingError("width", f"{{name}} must be a positive multiple of 32, got {config.width}")
    for name, high in LIMITS.items():
        if not 1 <= getattr(config, name) <= high:
            raise SettingError(name, f"{{name}} must be between 1 and {high} (a toy model a CPU can hold), got {getattr(config, name)}")


def build_toy_janus(config: JanusTrainConfig, image_size: int) -> tuple[Any, Any]:
    """A fresh ``JanusForConditionalGeneration`` at the config's sizes (weights from ``config.seed``) and its tokenizer."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    from erasekit.autoregressive.tiny import BOI, IMAGE, _token_id, janus_tokenizer

    check_sizes(config, image_size)
    tok = janus_tokenizer(config.clip_merges)
    levels = (image_size // config.grid).bit_length()  # the decoder upsamples 2**(levels - 1) times
    kv_heads = config.heads // 2 if config.heads % 2 == 0 else config.heads
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=config.width, intermediate_size=2 * config.width, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=kv_heads, max_position_embeddings=128 + config.grid**2, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    # the understanding encoder is never trained nor used for generation: the smallest one transformers builds
    vision = JanusVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=image_size // config.grid,
        projection_dim=config.width, depth=1, num_image_tokens=config.grid**2, mlp_ratio=1.0,
    )
    vq = JanusVQVAEConfig(
        embed_dim=config.code_dim, num_embeddings=config.codebook, latent_channels=config.vq_channels, base_channels=config.vq_channels,
        channel_multiplier=[1] * levels, num_res_blocks=1, projection_dim=config.width, image_token_embed_dim=config.width,
        num_hidden_layers=2,
    )
    janus_config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=_token_id(tok, IMAGE))
    with torch.random.fork_rng():  # weights from the seed alone; the caller's global generator is left alone
        torch.manual_seed(config.seed)
        model = JanusForConditionalGeneration(janus_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        generation_kwargs={"boi_token_id": _token_id(tok, BOI)},
    )
    return model, tok


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW in [-1, 1] (the VQ decoder's output range)."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _codes(vq: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's normalised vectors (B x D x g x g) and the normalised codebook (K x D)."""
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    return z, F.normalize(vq.quantize.embedding.weight, dim=1)


def _nearest(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the codebook row of highest cosine with each vector (B x g x g)."""
    return torch.einsum("bdhw,kd->bhwk", z, book).argmax(-1)


def vq_losses(vq: Any, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction (MSE + L1/2), codebook + beta * commitment loss (van den Oord et al. 2017, eq. 3), and the codes used.

    The decoder sees the normalised codebook rows (straight-through gradient to the encoder), as
    ``JanusVQVAE.decode`` feeds them at generation time.
    """
    z, book = _codes(vq, x)
    index = _nearest(z, book)
    quant = book[index].permute(0, 3, 1, 2)
    codebook_loss = F.mse_loss(quant, z.detach()) + beta * F.mse_loss(z, quant.detach())
    recon = vq.decoder(vq.post_quant_conv(z + (quant - z).detach()))
    recon_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
    return recon_loss, codebook_loss, index


@torch.no_grad()
def tokenize_images(vq: Any, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Image tokens (N x g*g, row-major as Janus reads them) of uint8 NHWC images, consistent with ``JanusVQVAE.decode``."""
    out = []
    for start in range(0, len(images), batch_size):
        z, book = _codes(vq, pixels(images[start : start + batch_size]))
        out.append(_nearest(z, book).flatten(1))
    if not out:
        raise ErasekitError("no images to tokenise")
    return torch.cat(out)


def restart_dead_codes(vq: Any, usage: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> int:
    """Move every codebook row unused since the last restart onto a random encoder vector of this batch; returns how many.

    The usual cure for codebook collapse (e.g. Dhariwal et al. 2020, Jukebox); ``usage`` is zeroed after.
    """
    dead = (usage == 0).nonzero().flatten()
    if len(dead):
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, len(flat), (len(dead),), generator=generator)
        with torch.no_grad():
            vq.quantize.embedding.weight[dead] = flat[pick]
    usage.zero_()
    return int(len(dead))
