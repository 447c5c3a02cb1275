"""SPM's adapter at inference: rank-1 "membranes" on the UNet's linear and conv layers, gated per prompt.

*Facilitated transport* (Lyu et al., CVPR 2024, §3.3): the adapter's strength for each prompt of a batch follows
that prompt's similarity to the erased concept, so prompts far from it pass through the base model unchanged.
Our rule (stated, not copied): ``s`` is the largest cosine similarity between any of the prompt's token states
(the text encoder's output the UNet attends to, the start token left out) and the concept's own token states saved
at erase time; the gate rises linearly from 0 at ``low`` (calibrated: the most similar prompt that must pass, the
empty prompt and the anchors included) to 1 at ``high``, times ``strength``. With transport off every prompt gets
``strength``. The gate is differentiable in the prompt's states, so attacks search through it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError

SETTINGS = ("transport", "low", "high", "strength")


def gate_similarity(states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per prompt (rows of B x T x width): the largest cosine between a token state (start token excluded) and a key."""
    s = F.normalize(states[:, 1:].float(), dim=-1) @ F.normalize(keys.float().to(states.device), dim=-1).t()
    return s.amax(dim=(1, 2))


def gate(states: torch.Tensor, keys: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """The adapter strength of each prompt of the batch (B)."""
    strength = float(settings["strength"])
    if not settings["transport"]:
        return torch.full((states.shape[0],), strength, device=states.device)
    low, high = float(settings["low"]), float(settings["high"])
    return ((gate_similarity(states, keys) - low) / (high - low)).clamp(0.0, 1.0) * strength


def adapter_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The UNet modules the saved adapter acts on (keys ``<module>.down`` / ``<module>.up``)."""
    return sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".down", ".up"))})


def _check(settings: dict[str, Any]) -> dict[str, Any]:
    if sorted(settings) != sorted(SETTINGS):
        raise ErasekitError(f"an spm hook needs exactly the settings {', '.join(SETTINGS)}, got {', '.join(sorted(settings)) or 'none'}; the delta is damaged")
    if not isinstance(settings["transport"], bool):
        raise ErasekitError(f"the spm setting transport must be true or false, got {settings['transport']!r}")
    values = [settings[k] for k in ("low", "high", "strength")]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ErasekitError(f"the spm settings low, high and strength must be finite numbers, got {values}")
    if not settings["low"] < settings["high"]:
        raise ErasekitError(f"the spm gate needs low < high, got low {settings['low']} and high {settings['high']}; erase again")
    return settings


def build_spm_hook(tensors: dict[str, torch.Tensor], settings: dict[str, Any], unet: nn.Module) -> Any:
    """Check the adapter against ``unet`` and return the installer of its gate and membranes (nothing is changed yet)."""
    settings = _check(dict(settings))
    keys = tensors.get("gate.keys")
    if keys is None or keys.dim() != 2 or keys.shape[0] == 0:
        raise ErasekitError("an spm hook needs 'gate.keys' (the concept's token states, n x width); the delta is damaged")
    modules = dict(unet.named_modules())
    parts: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    for name in adapter_names(tensors):
        module, down, up = modules.get(name), tensors.get(f"{name}.down"), tensors.get(f"{name}.up")
        if down is None or up is None:
            raise ErasekitError(f"the spm adapter of {name} lacks its down or up half; the delta is damaged")
        if isinstance(module, nn.Linear):
            fits = down.shape == (1, module.in_features) and up.shape == (module.out_features, 1)
        elif isinstance(module, nn.Conv2d):
            fits = down.shape == (1, module.in_channels // module.groups, *module.kernel_size) and up.shape == (module.out_channels, 1, 1, 1)
        else:
            raise ErasekitError(f"the spm adapter names {name}, which this UNet has not as a linear or conv layer; it was made for another model")
        if not fits:
            raise ErasekitError(f"the spm adapter of {name} has shapes {tuple(down.shape)}/{tuple(up.shape)} that do not fit this UNet's layer; it was made for another model")
        parts.append((module, down, up))
    if not parts:
        raise ErasekitError("the spm hook holds no adapter; the delta is damaged")

    def install() -> list[Any]:
        state: dict[str, torch.Tensor] = {}

        def read_prompt(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[-1] != keys.shape[1]:
                raise ErasekitError(f"the spm gate reads {keys.shape[1]}-wide prompt states, which this UNet call does not pass; it was made for another model")
            state["gate"] = gate(states, keys, settings)

        def membrane(layer: nn.Module, down: torch.Tensor, up: torch.Tensor) -> Any:
            def add(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
                x = inputs[0]
                d, u = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
                if isinstance(layer, nn.Conv2d):
                    c: Any = layer  # its padding may be a string ("same"); conv2d takes either form
                    delta = F.conv2d(F.conv2d(x, d, None, c.stride, c.padding, c.dilation, c.groups), u)
                else:
                    delta = F.linear(F.linear(x, d), u)
                g = state["gate"].to(x.device, x.dtype)
                g = g.repeat_interleave(delta.shape[0] // g.shape[0]) if delta.shape[0] != g.shape[0] and delta.shape[0] % g.shape[0] == 0 else g
                return output + g.view(-1, *([1] * (delta.dim() - 1))) * delta

            return add

        handles = [unet.register_forward_pre_hook(read_prompt, with_kwargs=True)]
        handles += [module.register_forward_hook(membrane(module, down, up)) for module, down, up in parts]
        return handles

    return install
