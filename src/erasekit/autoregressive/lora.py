"""LoRA on a Janus model's language model (the ``lora`` train set), with PEFT, and its merge into a plain weights delta.

The adapter sits on the attention projections ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` of every layer of the
Llama language model (``model.language_model.layers.*.self_attn``), nothing else: the MLPs, the image head, the
generation embeddings, the VQ model and the understanding encoder keep their base weights. ``lora_alpha`` equals the
rank (scaling 1), as on the diffusion side (:func:`erasekit.models.add_lora`).

A trained adapter leaves as a plain ``weights`` delta (:mod:`.delta`): each adapted matrix *merged*,
``W + B @ A`` (keys ``janus.<parameter name>``, the names of the model without adapters). Applying, saving and
loading are then those of every Janus delta, and the merged tensors are stored as computed, so save -> load -> apply
gives bit-identical weights, hence identical generations. The change of each matrix has rank at most the LoRA rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError

LORA_ADAPTER = "erasekit"
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT full-matches a string target against each module's name (as ``JanusForConditionalGeneration.named_modules`` gives it)
LORA_PATTERN = rf"model\.language_model\.layers\.\d+\.self_attn\.({'|'.join(LORA_PROJECTIONS)})"


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """The PEFT-wrapped layers of ``model`` by module name (empty when it carries no adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def add_janus_lora(model: nn.Module, rank: int, seed: int = 0) -> dict[str, nn.Parameter]:
    """Attach a rank-``rank`` LoRA to the language model's attention projections; return its (trainable) parameters.

    The base weights stay frozen. The adapter's initial ``A`` is drawn from a generator seeded with ``seed`` inside a
    forked RNG (``B`` starts at zero, so the model is unchanged): the same seed gives the same adapter whatever the
    global RNG, which is left as it was.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ErasekitError(f"LoRA rank must be >= 1, got {rank}")
    if lora_layers(model):
        raise ErasekitError("this Janus model already carries a LoRA adapter; load a fresh model")
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=True, target_modules=LORA_PATTERN)
    model.requires_grad_(False)
    with torch.random.fork_rng():  # PEFT's init draws from the global RNG: make it a function of the seed only
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=LORA_ADAPTER)
        except ValueError as exc:  # PEFT's "target modules not found" (another architecture)
            remove_janus_lora(model)
            raise ErasekitError(f"this model has no Llama attention projections to put a LoRA on ({' '.join(str(exc).split())[:120]})") from None
    params = {n: p for n, p in model.named_parameters() if f".lora_A.{LORA_ADAPTER}." in n or f".lora_B.{LORA_ADAPTER}." in n}
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    return params


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every LoRA layer switched off (a no-op on a model without adapters)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_lora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted matrix with its LoRA merged in, ``W + scaling * B @ A``, by the name it has without adapters.

    The model is not changed. Only weight matrices are returned (a LoRA changes no bias).
    """
    merged = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(LORA_ADAPTER)
            merged[f"{name}.weight"] = (base.weight + delta.to(base.weight.dtype)).detach().clone().contiguous()
    return merged


def remove_janus_lora(model: nn.Module) -> None:
    """Unwrap every PEFT layer back to its base module (the adapter dropped, not merged) and drop PEFT's config.

    The model then has exactly its original modules, parameter names and weights.
    """
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
