"""The Janus family: load a folder, encode prompts, sample image tokens with CFG, teacher-forced logits, decode to pixels.

Everything runs on transformers' own ``JanusForConditionalGeneration``; only the sampling loop is ours, so that a
seed means the same tokens everywhere (one CPU ``torch.Generator`` per prompt) and the loop can run on the weights
being trained. It follows ``JanusForConditionalGeneration.generate(generation_mode="image")`` step for step:

* the prompt is ``<|User|>: {prompt}\\n\\n<|Assistant|>:`` followed by the begin-of-image token (Janus-Pro's format);
* the unconditional branch is the same sequence with every token but BOS and begin-of-image replaced by pad;
* each image token is drawn from ``softmax(l / T)`` with ``l = uncond + s * (cond - uncond)`` (the generation head's
  logits, classifier-free guidance on logits), and fed back through the generation embeddings and aligner.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erasekit.autoregressive.lora import LORA_PATTERN
from erasekit.errors import ErasekitError

PROMPT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"
TRAIN_SETS = ("attn", "mlp", "head", "full", "lora")
VQ_PREFIX = "model.vqmodel."
BOI_TOKEN = "<begin_of_image>"  # Janus's begin-of-image token, when the tokenizer does not name its own


@dataclass(frozen=True)
class Prompts:
    """A batch of tokenised prompts, left-padded as Janus's processor pads them."""

    input_ids: torch.Tensor  # B x L
    attention_mask: torch.Tensor  # B x L, 0 on left padding

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def positions(self) -> torch.Tensor:
        """Position ids that skip the left padding (the first real token is position 0)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @staticmethod
    def cat(batches: Sequence[Prompts]) -> Prompts:
        """Join batches of the same length."""
        return Prompts(torch.cat([b.input_ids for b in batches]), torch.cat([b.attention_mask for b in batches]))


@dataclass
class Janus:
    """A loaded Janus: the model, its tokenizer, and where it came from (the family's 'pipeline')."""

    model: Any  # a transformers JanusForConditionalGeneration
    tokenizer: Any
    name_or_path: str = ""

    @property
    def bos_id(self) -> int:
        """The beginning-of-sequence token id."""
        return int(self.tokenizer.bos_token_id)

    @property
    def pad_id(self) -> int:
        """The pad token id (what the unconditional branch reads)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def boi_id(self) -> int:
        """The begin-of-image token id (the last token of every generation prompt)."""
        return int(self.tokenizer.convert_tokens_to_ids(getattr(self.tokenizer, "boi_token", None) or BOI_TOKEN))

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device


def image_token_count(model: Any) -> int:
    """Image tokens per image (the VQ model's grid, side squared)."""
    side = model.model.vqmodel.quantize.quant_state_dims
    return int(side[0] * side[1])


def image_size(model: Any) -> int:
    """Pixels per side of a decoded image: the token grid times the VQ decoder's upsampling."""
    vq = model.model.vqmodel.config
    return int(vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1))


def check_resolution(model: Any, size: int) -> None:
    """Refuse, in one line, an image size the model's VQ tokenizer cannot turn into its token grid."""
    native = image_size(model)
    if size != native:
        raise ErasekitError(f"this Janus model's VQ tokenizer makes {native}x{native}-pixel images ({image_token_count(model)} tokens); "
                            f"{size}x{size} cannot be tokenised, pass --image-size {native}")


def check_folder(folder: Path) -> None:
    """Refuse a folder that is not a whole saved Janus (its config and VQ image tokenizer weights), one line each."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ErasekitError(f"cannot read {config_file} ({exc.__class__.__name__}); pass a folder saved with JanusForConditionalGeneration.save_pretrained") from None
    if config.get("model_type") != "janus":
        raise ErasekitError(f"{folder} holds a {config.get('model_type') or 'model of unknown type'!s}, not a Janus model (config.json model_type 'janus')")
    if not isinstance(config.get("vq_config"), dict):
        raise ErasekitError(f"{folder}/config.json has no vq_config: the folder lacks its VQ image tokenizer; save the whole Janus model")
    keys = _weight_names(folder)
    if not any(k.startswith(VQ_PREFIX) for k in keys):
        raise ErasekitError(f"{folder} has no VQ image tokenizer weights ({VQ_PREFIX}*); save the whole JanusForConditionalGeneration, not its language model")


def _weight_names(folder: Path) -> set[str]:
    """Tensor names of a saved model's safetensors (one file or a sharded index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ErasekitError(f"{folder} has no model.safetensors; save the model with save_pretrained (safetensors only, never pickle)")
    with safe_open(str(single), framework="pt") as fh:
        return set(fh.keys())


def load_janus(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Janus:
    """Load a Janus folder with transformers' own classes (checked first: config, VQ model weights)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    from erasekit.models import quiet_loading

    folder = Path(folder)
    check_folder(folder)
    with quiet_loading():
        try:
            loaded: Any = JanusForConditionalGeneration.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        # a config transformers cannot build (strict field types, sizes its layers refuse) or weights that do not fit it
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, AssertionError, StrictDataclassError) as exc:
            raise ErasekitError(f"transformers cannot load the Janus model in {folder} ({' '.join(str(exc).split())[:160]}); "
                                "its config.json must describe the saved weights") from None
    model, info = loaded
    missing = sorted(set(info.get("missing_keys", ())) - {"lm_head.weight"})  # the text head is tied to the token embeddings
    if missing:  # transformers would draw these at random: refuse rather than generate from a half-random model
        raise ErasekitError(f"{folder} lacks {len(missing)} weights its config.json asks for (e.g. {missing[0]}); save the whole model with save_pretrained")
    if tokenizer.pad_token_id is None or tokenizer.bos_token_id is None:
        raise ErasekitError(f"the tokenizer in {folder} has no pad or BOS token; Janus's unconditional branch needs both")
    model.to(device).eval()
    model.requires_grad_(False)
    return Janus(model, tokenizer, str(folder))


def encode_prompts(janus: Janus, prompts: Sequence[str]) -> Prompts:
    """Token ids of ``prompts`` in Janus's image-generation format, ending in the begin-of-image token (left-padded)."""
    boi = janus.tokenizer.convert_ids_to_tokens(janus.boi_id)
    texts = [PROMPT_FORMAT.format(prompt=p) + boi for p in prompts]
    enc = janus.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return Prompts(enc["input_ids"].to(janus.device), enc["attention_mask"].to(janus.device))


def unconditional(janus: Janus, prompts: Prompts) -> Prompts:
    """Janus's unconditional branch: every token but BOS and begin-of-image replaced by pad (same mask)."""
    ids = prompts.input_ids
    keep = (ids == janus.bos_id) | (ids == janus.boi_id)
    return Prompts(torch.where(keep, ids, torch.full_like(ids, janus.pad_id)), prompts.attention_mask)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits, as Janus applies it: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def _image_embeds(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Input embeddings of image tokens (the generation embeddings through the generation aligner)."""
    return model.prepare_embeddings_for_image_generation(tokens)


def image_logits(model: Any, prompts: Prompts, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced generation-head logits (B x N x codebook) at each image-token position of ``tokens`` (B x N).

    Position i reads the prompt and ``tokens[:, :i]``; it is the distribution the sampler draws ``tokens[:, i]`` from.
    ``tokens`` may be a prefix of an image (the first n positions).
    """
    text = model.get_input_embeddings()(prompts.input_ids)
    embeds = torch.cat([text, _image_embeds(model, tokens[:, :-1])], dim=1)
    n, length = tokens.shape[1], prompts.input_ids.shape[1]
    mask = torch.cat([prompts.attention_mask, prompts.attention_mask.new_ones(len(prompts), n - 1)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    return model.model.generation_head(hidden[:, length - 1 :])


class ImageLogits(nn.Module):
    """:func:`image_logits` of one model as a module, so ``torch.func.functional_call`` can swap its weights (the frozen base)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, prompts: Prompts, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher-forced image-token logits."""
        return image_logits(self.inner, prompts, tokens)


@torch.no_grad()
def sample_image_tokens(
    janus: Janus, prompts: Prompts, seeds: Sequence[int], guidance: float, temperature: float = 1.0, cfg: bool = True,
) -> torch.Tensor:
    """Image tokens (B x N) drawn as Janus draws them: CFG on the head's logits, one CPU generator per prompt.

    With ``cfg`` False only the conditional branch runs (``guidance`` is unused); with ``cfg`` and ``guidance`` 1
    the guided logits equal the conditional ones.
    """
    model = janus.model
    if len(seeds) != len(prompts):
        raise ErasekitError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if temperature <= 0:
        raise ErasekitError(f"temperature must be > 0, got {temperature}")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    both = Prompts.cat([prompts, unconditional(janus, prompts)]) if cfg else prompts
    b, n = len(prompts), image_token_count(model)
    mask = both.attention_mask
    positions = both.positions()
    embeds = model.get_input_embeddings()(both.input_ids)
    cache = None
    tokens = torch.zeros(b, n, dtype=torch.long)
    lm = model.model.language_model
    for i in range(n):
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache = out.cache
        logits = model.model.generation_head(out.last_hidden_state[:, -1]).float()
        if cfg:
            logits = guided_logits(logits[:b], logits[b:], guidance)
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        if not bool(torch.isfinite(probs).all()):  # e.g. a temperature so small that logits / T overflow
            raise ErasekitError(f"the image-token probabilities came out undefined at guidance {guidance} and temperature {temperature}; "
                                "raise the temperature or lower the guidance")
        step = torch.stack([torch.multinomial(probs[r], 1, generator=generators[r])[0] for r in range(b)])
        tokens[:, i] = step
        fed = step.to(mask.device)
        embeds = _image_embeds(model, (torch.cat([fed, fed]) if cfg else fed)[:, None])
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return tokens


@torch.no_grad()
def decode_tokens(model: Any, tokens: torch.Tensor) -> np.ndarray:
    """uint8 images (N x H x W x 3) of image tokens through the VQ decoder (its [-1, 1] output mapped to 0..255)."""
    if tokens.ndim != 2 or tokens.shape[1] != image_token_count(model):
        raise ErasekitError(f"expected image tokens of shape (N, {image_token_count(model)}), got {tuple(tokens.shape)}")
    pixels = model.decode_image_tokens(tokens.to(next(model.parameters()).device))
    return ((pixels.float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8).cpu().numpy()


def generate(janus: Janus, prompts: Sequence[str], seeds: Sequence[int], guidance: float = 5.0, temperature: float = 1.0) -> np.ndarray:
    """Images (uint8 N x H x W x 3), one seed per prompt (Janus-Pro's default CFG scale: 5)."""
    tokens = sample_image_tokens(janus, encode_prompts(janus, prompts), seeds, guidance, temperature)
    return decode_tokens(janus.model, tokens)


def _train_set_of(name: str) -> set[str]:
    """The named sets a Janus parameter belongs to (its name as ``named_parameters`` gives it)."""
    found = set()
    if name.startswith("model.language_model.") or name.startswith("model.generation_"):
        found.add("full")
    if name.startswith("model.language_model.layers.") and ".self_attn." in name:
        found.add("attn")
    if name.startswith("model.language_model.layers.") and ".mlp." in name:
        found.add("mlp")
    if name.startswith("model.generation_head."):
        found.add("head")
    if re.fullmatch(rf"{LORA_PATTERN}\.weight", name):  # the matrices a LoRA (merged) changes
        found.add("lora")
    return found


def train_parameters(model: nn.Module, train_set: str) -> dict[str, nn.Parameter]:
    """The parameters a train set changes: ``attn``/``mlp`` (the language model's layers), ``head`` (the image head), ``full``, ``lora``.

    ``full`` is the whole image-generation path (language model, generation embeddings, aligner and head); the VQ
    model and the understanding encoder never train. The text head is tied to the token embeddings. ``lora`` names
    the matrices a LoRA changes once merged: the language model's attention projections ``q_proj``/``k_proj``/
    ``v_proj``/``o_proj`` (weights only); the adapter itself is :func:`erasekit.autoregressive.lora.add_janus_lora`'s.
    """
    if train_set not in TRAIN_SETS:
        raise ErasekitError(f"unknown train method {train_set!r} for Janus; choose one of: {', '.join(TRAIN_SETS)}")
    chosen = {n: p for n, p in model.named_parameters() if train_set in _train_set_of(n)}
    if not chosen:
        raise ErasekitError(f"train method {train_set!r} selects no parameter of this Janus model")
    return chosen
