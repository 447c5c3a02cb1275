"""Flow-matching families: SD3 (MMDiT, three text encoders) and FLUX.1 (Flux transformer, T5 + pooled CLIP).

Both are rectified flows sampled with Euler steps on the pipeline's own σ grid (shift included).
Where the image attends to the text is joint attention: the text stream's key and value projections
(``add_k_proj`` / ``add_v_proj``) of every double-stream block; that is ``xattn`` here. Those read a text
stream re-computed in every block, so closed-form edits (UCE, RECE) change the one linear map applied to
the text encoders' states themselves, ``context_embedder``, which every text-stream projection reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.families.base import Cond, Family, Schedule
from erasekit.families.schedules import FlowSchedule

TEXT_KV = (".attn.add_k_proj.", ".attn.add_v_proj.")
IMAGE_ATTN = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
JOINT_LORA = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _shift(config: Any, seq_len: int, max_shift: float) -> float:
    """The resolution-dependent shift ``mu`` the pipelines compute (linear in the image's token count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(
        seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", max_shift),
    ))


def _t5_row(tokenizer: Any, text: str, max_length: int) -> int:
    """T5 has no start token: the last word token is the row before ``</s>`` (len(ids) - 2); ``</s>``'s (0) for ''."""
    return max(len(tokenizer(text, truncation=True, max_length=max_length).input_ids) - 2, 0)


def _check(module: Any) -> None:
    from erasekit.models import is_released

    if module is not None and is_released(module):
        raise ErasekitError("this pipeline's text encoders were released by erase(..., release_unused=True); load the model again to encode prompts")


class FlowFamily(Family):
    """What SD3 and FLUX.1 share: a transformer, joint attention, an Euler σ grid."""

    lora_targets = JOINT_LORA
    prefix = "transformer"
    max_sequence_length: int = 0  # T5 rows in ``hidden``

    def denoiser(self, pipe: Any) -> nn.Module:
        """The pipeline's transformer."""
        return pipe.transformer

    def is_xattn(self, name: str) -> bool:
        """The text stream's keys and values in joint attention."""
        return any(k in f".{name}" for k in TEXT_KV)

    def is_selfattn(self, name: str) -> bool:
        """The image stream's own projections."""
        return any(k in f".{name}" for k in IMAGE_ATTN)

    def frozen_always(self, name: str) -> bool:
        """Time/text embedders, patch embedding and the output head stay as they are under ``noxattn``."""
        return name.startswith(("time_text_embed", "norm_out", "proj_out", "pos_embed", "x_embedder", "context_embedder"))

    def closed_form_weights(self, model: nn.Module, keys: bool = True) -> dict[str, torch.Tensor]:
        """``context_embedder.weight``, whatever ``keys`` says (there are no per-block keys); its bias stays: UCE's form is on W."""
        embedder = getattr(model, "context_embedder", None)
        if not isinstance(embedder, nn.Linear):
            raise ErasekitError(f"this {self.label} transformer has no linear context_embedder to edit in closed form")
        return {"context_embedder.weight": embedder.weight}

    def key_width(self, pipe: Any) -> int:
        """The text encoders' state width: ``context_embedder``'s input features."""
        return int(pipe.transformer.context_embedder.in_features)

    def image_size(self, pipe: Any) -> int:
        """Pixels per side of generated images: the VAE's sample size (1024 for the released models)."""
        return int(pipe.vae.config.sample_size)

    def pipeline_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Height and width: :meth:`image_size` (the pipelines' own default reads the transformer's sample size)."""
        size = self.image_size(pipe)
        return {"height": size, "width": size}

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float) -> np.ndarray:
        """Images at :meth:`image_size` with the family's own pipeline."""
        size = self.image_size(pipe)
        pipe.set_progress_bar_config(disable=True)
        out = []
        for prompt, seed in zip(prompts, seeds):
            gen = torch.Generator().manual_seed(int(seed))
            image = pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                         generator=gen, output_type="np").images
            out.append((np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(out)


class SD3(FlowFamily):
    """Stable Diffusion 3 / 3.5: MMDiT on two CLIPs and T5, classifier-free guided."""

    name, label = "sd3", "SD3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    max_sequence_length = 256

    def _encode(self, pipe: Any, prompts: Sequence[str]) -> Cond:
        """``StableDiffusion3Pipeline.encode_prompt``: CLIPs' penultimate states and T5's side by side, pooled CLIPs."""
        _check(pipe.text_encoder)
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe.transformer.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return Cond({"hidden": hidden, "pooled": pooled})

    def slot_encoders(self, pipe: Any) -> list[tuple[Any, nn.Module]]:
        """CLIP-L and CLIP-G: one CLIP vocabulary, two embedding tables."""
        return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]

    def text_only_encoders(self, pipe: Any) -> list[nn.Module]:
        """T5, where loaded."""
        return [pipe.text_encoder_3] if pipe.text_encoder_3 is not None else []

    def last_token_rows(self, pipe: Any, text: str) -> tuple[int, ...]:
        """Its CLIP row (CLIP-L and CLIP-G side by side, len(ids) - 2) and, with T5 loaded, its T5 row after the CLIP part."""
        clip = max(len(pipe.tokenizer(text, truncation=True, max_length=pipe.tokenizer_max_length).input_ids) - 2, 0)
        if pipe.text_encoder_3 is None:  # no T5: that part is zeros, which no edit moves
            return (clip,)
        return (clip, int(pipe.tokenizer_max_length) + _t5_row(pipe.tokenizer_3, text, self.max_sequence_length))

    def part_ends(self, pipe: Any) -> tuple[int, ...]:
        """The CLIP part (77 rows), then the T5 part (``max_sequence_length`` rows)."""
        clip = int(pipe.tokenizer_max_length)
        return (clip,) if pipe.text_encoder_3 is None else (clip, clip + self.max_sequence_length)

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The flow velocity; SD3's transformer takes the time as 1000 σ."""
        return model(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=cond.parts["hidden"],
                     pooled_projections=cond.parts["pooled"], return_dict=False)[0]

    def latent_shape(self, pipe: Any) -> tuple[int, ...]:
        """(1, C, h, w) at the image size."""
        side = self.image_size(pipe) // pipe.vae_scale_factor
        return (1, pipe.transformer.config.in_channels, side, side)

    def schedule(self, pipe: Any, steps: int) -> Schedule:
        """The pipeline's σ grid for ``steps`` (with its resolution-dependent shift where configured)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            side = self.latent_shape(pipe)[-1] // pipe.transformer.config.patch_size
            kwargs["mu"] = _shift(scheduler.config, side * side, 1.16)
        scheduler.set_timesteps(steps, **kwargs)
        return FlowSchedule(scheduler.sigmas.tolist())


class Flux(FlowFamily):
    """FLUX.1 [dev]/[schnell]: guidance-distilled (no unconditional branch); T5 states, pooled CLIP, packed latents."""

    name, label = "flux", "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    uses_cfg = False
    max_sequence_length = 512
    guidance = 3.5  # FLUX.1 [dev]'s default embedded guidance

    def _grid(self, pipe: Any) -> int:
        return self.image_size(pipe) // (pipe.vae_scale_factor * 2)  # latent side / 2: packed tokens per side

    def _encode(self, pipe: Any, prompts: Sequence[str]) -> Cond:
        """``FluxPipeline.encode_prompt``: T5 states and CLIP's pooled output; positions ride along unbatched."""
        _check(pipe.text_encoder_2)
        hidden, pooled, text_ids = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=pipe.transformer.device, max_sequence_length=self.max_sequence_length
        )
        side = self._grid(pipe)
        image_ids = pipe._prepare_latent_image_ids(1, side, side, hidden.device, hidden.dtype)
        return Cond({"hidden": hidden, "pooled": pooled}, {"txt_ids": text_ids, "img_ids": image_ids, "guidance": self.guidance})

    def slot_encoders(self, pipe: Any) -> list[tuple[Any, nn.Module]]:
        """CLIP-L, whose pooled output the transformer takes."""
        return [(pipe.tokenizer, pipe.text_encoder)]

    def text_only_encoders(self, pipe: Any) -> list[nn.Module]:
        """T5, whose states are ``hidden``."""
        return [pipe.text_encoder_2]

    def _vae_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Unpack the 2x2-packed token sequence."""
        size = self.image_size(pipe)
        return pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)

    def last_token_rows(self, pipe: Any, text: str) -> tuple[int, ...]:
        """Its row in T5's states, the only part of ``hidden``."""
        return (_t5_row(pipe.tokenizer_2, text, self.max_sequence_length),)

    def part_ends(self, pipe: Any) -> tuple[int, ...]:
        """One text part: T5's ``max_sequence_length`` rows."""
        return (self.max_sequence_length,)

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The flow velocity on packed latents; the transformer takes σ (not 1000 σ) and the embedded guidance."""
        guidance = None
        if getattr(model.config, "guidance_embeds", False):
            guidance = torch.full((x.shape[0],), float(cond.static["guidance"]), device=x.device, dtype=torch.float32)
        return model(hidden_states=x, timestep=(t / 1000).to(x.dtype), guidance=guidance, pooled_projections=cond.parts["pooled"],
                     encoder_hidden_states=cond.parts["hidden"], txt_ids=cond.static["txt_ids"], img_ids=cond.static["img_ids"],
                     return_dict=False)[0]

    def latent_shape(self, pipe: Any) -> tuple[int, ...]:
        """(1, tokens, 4 C): the 2x2-packed latent sequence."""
        side = self._grid(pipe)
        return (1, side * side, pipe.transformer.config.in_channels)

    def schedule(self, pipe: Any, steps: int) -> Schedule:
        """FluxPipeline's grid: σ linear from 1 to 1/S, shifted by the image's token count."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        side = self._grid(pipe)
        scheduler.set_timesteps(sigmas=sigmas, mu=_shift(scheduler.config, side * side, 1.15))
        return FlowSchedule(scheduler.sigmas.tolist())
