"""A tiny random Janus (``JanusForConditionalGeneration``) saved to a folder, built fully offline.

The model is transformers' own Janus with toy sizes: a 2-layer, 32-wide Llama language model, a one-layer
SigLIP-style understanding encoder, and a VQ image tokenizer whose decoder upsamples ``2**(levels - 1)`` times,
so ``grid`` x ``grid`` image tokens decode to ``image_size`` pixels. The tokenizer is the shipped CLIP BPE cut
after ``clip_merges`` merges (as :func:`erasekit.families.tiny.clip_tokenizer`), with a BOS-only template and the
special tokens Janus's prompt format and processor name (``<|User|>``, ``<begin_of_image>``, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, processors
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from erasekit.errors import ErasekitError

WIDTH = 32  # hidden size of the language model; the VQ model's GroupNorms need channels in multiples of 32
BOS, PAD = "<|startoftext|>", "<pad>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
ROLES = ("<|User|>", "<|Assistant|>")


def janus_tokenizer(clip_merges: int = 510) -> PreTrainedTokenizerFast:
    """A CLIP-BPE tokenizer in Janus's shape: BOS prepended (no EOS), a pad token, image and role special tokens."""
    from erasekit.families.tiny import clip_tokenizer

    clip = clip_tokenizer(clip_merges)
    backend = Tokenizer.from_str(clip.backend_tokenizer.to_str())
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token="<|endoftext|>", pad_token=PAD, unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI}, padding_side="left",
        model_max_length=256,
    )
    tok.add_special_tokens({"additional_special_tokens": list(ROLES)}, replace_extra_special_tokens=False)
    return tok


def _token_id(tok: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one token of ``tok``'s vocabulary."""
    found = tok.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found


def tiny_janus_config(tok: PreTrainedTokenizerFast, image_size: int = 16, grid: int = 4, codebook: int = 64) -> JanusConfig:
    """A tiny Janus config: ``grid`` x ``grid`` image tokens from a ``codebook``-entry VQ model at ``image_size`` pixels."""
    if grid < 1 or image_size % grid or (image_size // grid) & (image_size // grid - 1):
        raise ErasekitError(f"image_size {image_size} must be grid {grid} times a power of two (the VQ decoder upsamples by 2 per level)")
    levels = (image_size // grid).bit_length()  # upsampling factor 2**(levels - 1)
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    vision = JanusVisionConfig(
        hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=image_size // grid,
        projection_dim=WIDTH, depth=2, num_image_tokens=grid * grid, mlp_ratio=2.0,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=codebook, latent_channels=WIDTH, base_channels=WIDTH, channel_multiplier=[1] * levels,
        num_res_blocks=1, projection_dim=WIDTH, image_token_embed_dim=WIDTH, num_hidden_layers=2,
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=_token_id(tok, IMAGE))


def build_tiny_janus(folder: str | Path, seed: int = 0, image_size: int = 16, grid: int = 4, codebook: int = 64, clip_merges: int = 510) -> Path:
    """Build a tiny random Janus with its tokenizer, save both to ``folder`` (loadable with ``from_pretrained``), return the folder."""
    folder = Path(folder)
    tok = janus_tokenizer(clip_merges)
    config = tiny_janus_config(tok, image_size, grid, codebook)
    with torch.random.fork_rng():  # the weights depend on ``seed`` only, and the caller's global RNG is left alone
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    # what transformers' own Janus generate reads: pad and BOS ids, and the begin-of-image id among its generation kwargs
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        generation_kwargs={"boi_token_id": _token_id(tok, BOI)},
    )
    from erasekit.models import quiet_loading

    with quiet_loading():  # no "Writing model shards" bar
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder
