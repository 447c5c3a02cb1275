"""Adversarial slots: token positions 1..N of CLIP text encoders whose input embeddings are given vectors.

The attack (:mod:`erasekit.attack.search`) optimises free vectors in the CLIP token-embedding space and
reads the model's loss through the family's own prompt encoding. A forward hook on each CLIP encoder's
token-embedding table swaps the rows in, so position embeddings, the causal mask, the final norm and the
pooled output are the encoder's own, whatever its version. Text encoders with another vocabulary (T5)
read the prompt as text: they take no slot and keep no autograd history.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def _swap(slots: torch.Tensor) -> object:
    n = slots.shape[1]

    def swap(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] != slots.shape[0]:
            raise RuntimeError(f"slot hook: {slots.shape[0]} rows of slots for a batch of {output.shape[0]} prompts")
        return torch.cat([output[:, :1], slots.to(output.dtype), output[:, 1 + n :]], dim=1)

    return swap


@contextmanager
def swapped_slots(encoders: Sequence[nn.Module], slots: Sequence[torch.Tensor]) -> Iterator[None]:
    """While open, each encoder's token embeddings at positions 1..N are its ``slots`` tensor (B x N x its width)."""
    handles = [enc.get_input_embeddings().register_forward_hook(_swap(s)) for enc, s in zip(encoders, slots)]  # type: ignore[operator]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def constant(modules: Sequence[nn.Module]) -> Iterator[None]:
    """While open, the modules' weights record no gradient (their outputs do not depend on the slots: no graph is kept)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def embedding_table(encoder: nn.Module) -> torch.Tensor:
    """The encoder's token-embedding table (vocabulary x width), detached."""
    return encoder.get_input_embeddings().weight.detach()  # type: ignore[operator]
