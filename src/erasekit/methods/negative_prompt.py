"""A negative prompt carried by a delta: the empty prompt of classifier-free guidance's unconditional branch is read as saved tokens.

diffusers' pipelines encode ``""`` for the unconditional branch when no negative prompt is given; a ``negative-prompt``
hook (kind ``text-encoder-input``, :mod:`erasekit.hooks`) sits before the text encoder's first layer and replaces every
row of token ids equal to the empty prompt's with the saved negative prompt's, so ``generate``, ``evaluate``,
``compare`` and ``attack`` sample with that negative prompt without knowing of it. A prompt the user writes is never
changed; an explicit ``negative_prompt=`` given to the pipeline is encoded as usual (it is not the empty prompt).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError

TENSORS = ("empty_ids", "negative_ids", "negative_mask")


def prompt_tensors(tokenizer: Any, negative: str) -> dict[str, torch.Tensor]:
    """The hook's tensors: the empty prompt's and ``negative``'s token ids at the tokenizer's full length, and the latter's mask."""
    length = int(tokenizer.model_max_length)
    full = tokenizer(negative, padding="max_length", max_length=length, truncation=False, return_tensors="pt")
    if full.input_ids.shape[1] > length:
        raise ErasekitError(f"the negative prompt takes {full.input_ids.shape[1]} tokens, more than the text encoder's {length}; use a smaller grid or --negative seen")
    empty = tokenizer("", padding="max_length", max_length=length, return_tensors="pt")
    return {"empty_ids": empty.input_ids[0].long(), "negative_ids": full.input_ids[0].long(), "negative_mask": full.attention_mask[0].long()}


def build_negative_prompt(tensors: dict[str, torch.Tensor], settings: dict[str, Any], encoder: nn.Module) -> Any:
    """The installer of a negative-prompt hook on ``encoder`` (checked now: a damaged delta is refused before anything changes)."""
    if sorted(tensors) != sorted(TENSORS):
        raise ErasekitError(f"a negative-prompt hook holds the tensors {', '.join(TENSORS)}; this one holds {', '.join(sorted(tensors)) or 'none'}: the delta is damaged")
    empty, negative, mask = (tensors[k].long() for k in TENSORS)
    if not (empty.dim() == negative.dim() == mask.dim() == 1 and len(empty) == len(negative) == len(mask)):
        raise ErasekitError("a negative-prompt hook's token ids must be three rows of one length; the delta is damaged")
    vocab = int(getattr(getattr(encoder, "config", None), "vocab_size", 0) or 0)
    if vocab and int(max(empty.max(), negative.max())) >= vocab:
        raise ErasekitError(f"the negative prompt's token ids exceed this text encoder's vocabulary ({vocab}); it was made for another tokenizer")

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ids = args[0] if args else kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != len(empty):
            return None
        rows = (ids == empty.to(ids.device)).all(dim=1)
        if not bool(rows.any()):
            return None
        new_ids = torch.where(rows[:, None], negative.to(ids.device), ids)
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = torch.where(rows[:, None], mask.to(ids.device), kwargs["attention_mask"])
        if args:
            return (new_ids, *args[1:]), kwargs
        return args, {**kwargs, "input_ids": new_ids}

    def install() -> list[Any]:
        return [encoder.register_forward_pre_hook(pre_hook, with_kwargs=True)]

    return install
