"""UNet families: SD 1.x/2.x (one CLIP, ε or v prediction) and SDXL (two CLIPs, pooled embedding, time ids).

Both sample with DDIM on their DDPM schedule; cross-attention is every ``attn2`` (the image's queries
against the text's keys and values), self-attention every ``attn1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.families.base import Cond, Family, Schedule
from erasekit.families.schedules import DDIMSchedule


class UNetFamily(Family):
    """What SD 1.x/2.x and SDXL share: the UNet, its parameter sets, DDIM."""

    prefix = "unet"

    def denoiser(self, pipe: Any) -> nn.Module:
        """The pipeline's UNet2DConditionModel."""
        return pipe.unet

    def schedule(self, pipe: Any, steps: int) -> Schedule:
        """DDIM (eta 0) on the pipeline's DDPM betas, ε or v as its scheduler says."""
        return DDIMSchedule(pipe.scheduler.config, steps)

    def image_size(self, pipe: Any) -> int:
        """Pixels per side: the UNet's sample size times the VAE's downsampling."""
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def latent_shape(self, pipe: Any) -> tuple[int, ...]:
        """(1, C, H, W) at the UNet's sample size."""
        c = pipe.unet.config
        return (1, c.in_channels, c.sample_size, c.sample_size)

    def is_xattn(self, name: str) -> bool:
        """``attn2``: the image attends to the text."""
        return "attn2." in name

    def is_selfattn(self, name: str) -> bool:
        """``attn1``: the image attends to itself."""
        return "attn1." in name

    def frozen_always(self, name: str) -> bool:
        """The reference's ``noxattn`` also leaves the time embedding and the output head alone."""
        return name.startswith(("time_embedding", "conv_out", "conv_norm_out", "add_embedding"))

    def closed_form_weights(self, model: nn.Module, keys: bool = True) -> dict[str, torch.Tensor]:
        """Every cross-attention ``attn2.to_v`` weight (and ``attn2.to_k``'s when ``keys``): each reads ``hidden`` directly."""
        ends = ("attn2.to_v", "attn2.to_k") if keys else ("attn2.to_v",)
        out = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(ends)}
        if not out:
            raise ErasekitError(f"this {self.label} UNet has no cross-attention attn2.to_k/to_v projections to edit in closed form")
        return out

    def key_width(self, pipe: Any) -> int:
        """The UNet's ``cross_attention_dim`` (SDXL: both encoders' widths side by side)."""
        return int(pipe.unet.config.cross_attention_dim)

    def last_token_rows(self, pipe: Any, text: str) -> tuple[int, ...]:
        """The CLIP row before the end token (len(ids) - 2; 0, the start token, for '')."""
        ids = pipe.tokenizer(text, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
        return (max(len(ids) - 2, 0),)

    def part_ends(self, pipe: Any) -> tuple[int, ...]:
        """One text part: CLIP's 77 rows."""
        return (int(pipe.tokenizer.model_max_length),)


def _tokens(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _check_encoder(module: Any) -> None:
    from erasekit.models import is_released

    if module is None or is_released(module):
        raise ErasekitError("this pipeline's text encoder was released by erase(..., release_unused=True); load the model again to encode prompts")


class SD(UNetFamily):
    """Stable Diffusion 1.x and 2.x."""

    name, label = "sd", "SD 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)

    def _encode(self, pipe: Any, prompts: Sequence[str]) -> Cond:
        """CLIP's last hidden states (N x 77 x d), as the pipeline conditions on them."""
        _check_encoder(pipe.text_encoder)
        return Cond({"hidden": pipe.text_encoder(_tokens(pipe.tokenizer, prompts, pipe.text_encoder.device))[0]})

    def slot_encoders(self, pipe: Any) -> list[tuple[Any, nn.Module]]:
        """The one CLIP."""
        return [(pipe.tokenizer, pipe.text_encoder)]

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ε (or v) from the UNet; with an image adapter loaded, the ``image`` part's tokens too (none given: no image)."""
        if getattr(model, "encoder_hid_proj", None) is None:
            return model(x, t, encoder_hidden_states=cond.parts["hidden"]).sample
        from erasekit import image_prompt

        hidden = cond.parts["hidden"]
        tokens = cond.parts.get(image_prompt.PART)
        if tokens is None:
            tokens = image_prompt.empty_tokens(model, len(hidden), hidden)
        return image_prompt.predict_with_image(model, x, t, hidden, tokens)


class SDXL(UNetFamily):
    """Stable Diffusion XL: both encoders' penultimate states side by side, the second's pooled output, time ids."""

    name, label = "sdxl", "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def _encode(self, pipe: Any, prompts: Sequence[str]) -> Cond:
        """As ``StableDiffusionXLPipeline.encode_prompt`` builds it (no clip skip), with the default time ids."""
        _check_encoder(pipe.text_encoder_2)
        hidden, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            if encoder is None:
                continue
            out = encoder(_tokens(tokenizer, prompts, encoder.device), output_hidden_states=True)
            pooled = out[0]  # the projected pooled output of the last encoder is what the UNet takes
            hidden.append(out.hidden_states[-2])
        assert pooled is not None, "SDXL has a second text encoder"
        size = pipe.default_sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden[0].dtype).expand(len(prompts), 6)
        return Cond({"hidden": torch.cat(hidden, dim=-1), "pooled": pooled, "time_ids": time_ids.to(hidden[0].device)})

    def slot_encoders(self, pipe: Any) -> list[tuple[Any, nn.Module]]:
        """Both CLIPs (the refiner has only the second): one CLIP vocabulary, two embedding tables."""
        pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
        return [(tok, enc) for tok, enc in pairs if enc is not None]

    def uncond(self, pipe: Any) -> Cond:
        """Zeros where the pipeline forces them for an empty negative prompt (SDXL base), else the empty prompt."""
        empty = self.encode(pipe, [""])
        if not pipe.config.get("force_zeros_for_empty_prompt", False):
            return empty
        parts = dict(empty.parts, hidden=torch.zeros_like(empty.parts["hidden"]), pooled=torch.zeros_like(empty.parts["pooled"]))
        return Cond(parts, empty.static)  # the time ids stay: the pipeline conditions both branches on them

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ε (or v) from the UNet, with the pooled text embedding and time ids."""
        added = {"text_embeds": cond.parts["pooled"], "time_ids": cond.parts["time_ids"]}
        return model(x, t, encoder_hidden_states=cond.parts["hidden"], added_cond_kwargs=added).sample
