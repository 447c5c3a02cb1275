"""What every model family provides: conditioning, the model output, the noise schedule and its rollout.

A family (SD 1.x/2.x, SDXL, SD3, FLUX.1) is the only place that knows a model's shape. Methods see:

- :class:`Cond`: the text conditioning as named tensors with the batch first (SD: ``hidden``; SDXL adds
  ``pooled`` and ``time_ids``; SD3 and FLUX ``hidden`` and ``pooled``). Concatenating, indexing and
  mixing act on every part at once, so EAP's search mixes conditionings of any family the same way.
- :class:`Schedule`: the rollout convention of DESIGN.md §3 step 3 for that family's noise schedule: a
  :class:`Level` drawn per rollout point, the deterministic sampler that rolls out to it, and the x0 map.
- :class:`Family`: encode prompts, predict the raw model output, the trainable parameter sets by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from erasekit.errors import ErasekitError

TRAIN_SETS = ("xattn", "noxattn", "full", "selfattn", "lora")
Pipeline = Any  # a diffusers pipeline of a supported family (their components are set at run time: mypy sees Any)


def is_adapter(name: str) -> bool:
    """Whether a denoiser tensor belongs to a loaded IP-Adapter (its projection, or the to_k_ip/to_v_ip of an attention processor)."""
    return name.startswith("encoder_hid_proj.") or ".processor." in name


@dataclass(frozen=True)
class Cond:
    """A batch of text conditionings: named tensors sharing the first (batch) dimension."""

    parts: dict[str, torch.Tensor]
    static: dict[str, Any] = field(default_factory=dict)  # per-model inputs that have no batch dimension

    def __len__(self) -> int:
        return int(next(iter(self.parts.values())).shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Cond:
        """Apply ``fn`` to every part."""
        return Cond({k: fn(v) for k, v in self.parts.items()}, self.static)

    def __getitem__(self, index: slice | int | torch.Tensor) -> Cond:
        """Rows of the batch (an int keeps its batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda v: v[index])

    def expand(self, n: int) -> Cond:
        """A batch of ``n`` copies of a one-row conditioning."""
        return self.map(lambda v: v.expand(n, *v.shape[1:]))

    def detach(self) -> Cond:
        """Every part detached from the graph."""
        return self.map(lambda v: v.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        """Every floating part moved to ``device``/``dtype`` (integer parts keep their dtype)."""
        return self.map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def mix(self, weights: torch.Tensor) -> Cond:
        """Rows ``weights @ self``: each output row a weighted sum of this bank's rows (B x N weights)."""
        return self.map(lambda v: (weights.to(v.device, v.dtype) @ v.flatten(1)).view(weights.shape[0], *v.shape[1:]))

    def flat(self) -> torch.Tensor:
        """Every part flattened and joined per row (for distances between conditionings)."""
        return torch.cat([v.flatten(1).float() for v in self.parts.values()], dim=1)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Join batches."""
        first = conds[0]
        return Cond({k: torch.cat([c.parts[k] for c in conds]) for k in first.parts}, first.static)


Predict = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass(frozen=True)
class Level:
    """One rollout point (DESIGN.md §3 step 3, carried over to every schedule).

    ``k`` is drawn uniform in 0..S-1; the model is queried at time ``t`` (the family's timestep units) in
    bin k; the state handed to it is the sampler's state at grid point ``grid_t`` inside that bin, reached
    by ``steps`` deterministic steps from pure noise; the x0 map uses the noise level of that grid point.
    """

    k: int
    steps: int
    t: float
    grid_t: float


class Schedule(ABC):
    """A noise schedule on an S-point grid: draw levels, roll out to them, map outputs to x0."""

    steps: int

    @abstractmethod
    def draw(self, generator: torch.Generator) -> Level:
        """Draw a rollout point."""

    @abstractmethod
    def level(self, k: int, t: float | None = None) -> Level:
        """The rollout point of bin ``k`` (queried at ``t``, default the grid point's own time)."""

    @abstractmethod
    def step(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """One deterministic sampler step from grid point i (counted from pure noise) to i + 1."""

    @abstractmethod
    def grid_time(self, i: int) -> torch.Tensor:
        """The model's time input at grid point i (counted from pure noise)."""

    @abstractmethod
    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, level: Level) -> torch.Tensor:
        """The clean sample the model output implies at ``level``'s grid point."""

    @abstractmethod
    def noised(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training draw per sample: (x_t, the model's time input, the output a denoiser should give there)."""

    @abstractmethod
    def noised_at(self, x0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`noised` at given training-time fractions ``u`` in [0, 1) (one per sample) and noise ``eps``."""

    @abstractmethod
    def noise_level(self, grid_t: float) -> float:
        """The fraction of noise variance of the state at a grid time (1 - ᾱ, or σ² / (σ² + (1 - σ)²))."""

    @torch.no_grad()
    def rollout(
        self, predict: Predict, start: torch.Tensor, cond: Cond, uncond: Cond | None, n_steps: Sequence[int], guidance: float
    ) -> list[torch.Tensor]:
        """The states after each of ``n_steps`` sampler steps of one rollout from ``start`` (run once, to the largest).

        With ``uncond`` the output is classifier-free guided (one batched forward per step); without it
        (guidance-distilled models) the model is queried once and ``guidance`` is its own input.
        """
        b = len(cond)
        x = start.expand(b, *start.shape[1:]).clone()
        both = Cond.cat([uncond.expand(b), cond]) if uncond is not None else cond
        states: dict[int, torch.Tensor] = {0: x}
        for i in range(max(n_steps, default=0)):
            t = self.grid_time(i).to(x.device)
            if uncond is not None:
                e_un, e_c = predict(torch.cat([x, x]), t.expand(2 * b), both).chunk(2)
                out = e_un + guidance * (e_c - e_un)
            else:
                out = predict(x, t.expand(b), both)
            x = self.step(out, i, x)
            states[i + 1] = x
        return [states[n] for n in n_steps]


class Family(ABC):
    """One model family: the only code that knows its pipeline's shape."""

    name: str = ""
    label: str = ""
    pipeline_classes: tuple[str, ...] = ()
    uses_cfg: bool = True  # False for guidance-distilled models (FLUX.1-dev/schnell): no unconditional branch
    prefix: str = ""  # the pipeline attribute holding the denoiser: the key prefix of a weights delta (result.py)

    @abstractmethod
    def denoiser(self, pipe: Any) -> nn.Module:
        """The trainable network (a UNet or a transformer)."""

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: Sequence[str]) -> Cond:
        """The conditioning of ``prompts`` as the denoiser sees it."""
        return self._encode(pipe, prompts)

    @abstractmethod
    def _encode(self, pipe: Any, prompts: Sequence[str]) -> Cond:
        """:meth:`encode` with autograd as the caller has it (the attack differentiates through the text encoders)."""

    # -- closed-form edits (UCE, RECE): linear maps whose inputs are rows of the ``hidden`` conditioning --

    @abstractmethod
    def closed_form_weights(self, model: nn.Module, keys: bool = True) -> dict[str, torch.Tensor]:
        """The weight matrices a closed-form edit changes, by parameter name (each maps ``hidden`` rows)."""

    @abstractmethod
    def key_width(self, pipe: Any) -> int:
        """Width of a ``hidden`` row: the input width of :meth:`closed_form_weights`."""

    @abstractmethod
    def last_token_rows(self, pipe: Any, text: str) -> tuple[int, ...]:
        """Row of ``text``'s last word token in each text part of ``hidden`` (the part's first row for '')."""

    @abstractmethod
    def part_ends(self, pipe: Any) -> tuple[int, ...]:
        """End row (exclusive) of each text part of ``hidden``, in the order of :meth:`last_token_rows`."""

    def uncond(self, pipe: Any) -> Cond:
        """The conditioning the pipeline's classifier-free guidance takes as unconditional (the empty prompt)."""
        return self.encode(pipe, [""])

    @abstractmethod
    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw model output (ε, v or flow velocity) at latents ``x`` and times ``t``."""

    @abstractmethod
    def schedule(self, pipe: Any, steps: int) -> Schedule:
        """The S-step deterministic sampler grid of the pipeline's noise schedule."""

    @abstractmethod
    def latent_shape(self, pipe: Any) -> tuple[int, ...]:
        """Shape of one start noise (batch 1), in the layout the denoiser takes."""

    @abstractmethod
    def is_xattn(self, name: str) -> bool:
        """Whether a denoiser parameter is where the image attends to the text."""

    def is_selfattn(self, name: str) -> bool:
        """Whether a parameter belongs to image-to-image attention."""
        return False

    def frozen_always(self, name: str) -> bool:
        """Parameters ``noxattn`` leaves alone besides cross-attention (time embedding, output head)."""
        return False

    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def parameters(self, model: nn.Module, train_set: str) -> dict[str, nn.Parameter]:
        """The parameters a train set changes (``lora`` is an adapter, not a subset)."""
        if train_set not in TRAIN_SETS or train_set == "lora":
            raise ErasekitError(f"unknown train method {train_set!r}; choose one of: {', '.join(TRAIN_SETS)}")
        chosen = {}
        for name, param in model.named_parameters():
            if is_adapter(name):
                continue  # an image-prompt adapter loaded beside the model is not the model
            if train_set == "xattn":
                keep = self.is_xattn(name)
            elif train_set == "selfattn":
                keep = self.is_selfattn(name)
            elif train_set == "noxattn":
                keep = not (self.is_xattn(name) or self.frozen_always(name))
            else:
                keep = True
            if keep:
                chosen[name] = param
        if not chosen:
            raise ErasekitError(f"train method {train_set!r} selects no parameter of this {self.label} model")
        return chosen

    @abstractmethod
    def image_size(self, pipe: Any) -> int:
        """Pixels per side of the images the pipeline generates by default."""

    def start_noise(self, pipe: Any, generator: torch.Generator) -> torch.Tensor:
        """One start noise of :meth:`latent_shape` (drawn on the CPU, so a seed means the same noise everywhere)."""
        return torch.randn(self.latent_shape(pipe), generator=generator)

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float) -> np.ndarray:
        """Images (uint8 N x H x W x 3) with the family's own pipeline, one seed per prompt."""
        pipe.set_progress_bar_config(disable=True)
        out = []
        for prompt, seed in zip(prompts, seeds):
            gen = torch.Generator().manual_seed(int(seed))
            image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").images
            out.append((np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(out)

    # -- the adversarial-token attack: prompts whose CLIP token embeddings at positions 1..N are free vectors --

    def slot_encoders(self, pipe: Any) -> list[tuple[Any, nn.Module]]:
        """(tokenizer, text encoder) of every CLIP tower whose token embeddings the attack's slots replace (one vocabulary)."""
        raise ErasekitError(f"the adversarial-token attack does not support {self.label} models")

    def text_only_encoders(self, pipe: Any) -> list[nn.Module]:
        """Text encoders with their own vocabulary (T5): they read the slots' words as text, without gradient."""
        return []

    def slot_tokenizer(self, pipe: Any) -> Any:
        """The CLIP tokenizer whose whole-word tokens the slots may hold."""
        return self.slot_encoders(pipe)[0][0]

    def check_slots(self, pipe: Any) -> None:
        """Refuse in one line a pipeline the attack cannot search: a released text encoder, CLIP towers of different vocabularies."""
        from erasekit.models import is_released

        pairs = self.slot_encoders(pipe)
        if any(enc is None or is_released(enc) for enc in [*(e for _, e in pairs), *self.text_only_encoders(pipe)]):
            raise ErasekitError("this pipeline's text encoders were released by erase(..., release_unused=True); load the model again to attack it")
        vocab = pairs[0][0].get_vocab()
        if any(tok.get_vocab() != vocab for tok, _ in pairs[1:]):
            raise ErasekitError(f"the attack puts one CLIP token into every CLIP encoder of this {self.label} model, "
                                "but its CLIP tokenizers have different vocabularies")

    def slot_rows(self, pipe: Any, token_ids: torch.Tensor) -> torch.Tensor:
        """Float32 token embeddings of ``token_ids`` in every slot encoder, side by side (K x sum of widths)."""
        from erasekit.families.slots import embedding_table

        tables = [embedding_table(enc) for _, enc in self.slot_encoders(pipe)]
        device = tables[0].device
        return torch.cat([t[token_ids.to(t.device)].to(device=device, dtype=torch.float32) for t in tables], dim=-1)

    def encode_with_slots(self, pipe: Any, prompts: Sequence[str], slots: torch.Tensor) -> Cond:
        """:meth:`encode` of ``prompts``, differentiable in ``slots`` (B x N x sum of widths), the token embeddings at positions 1..N.

        Each CLIP encoder takes its share of ``slots`` (its width, in :meth:`slot_encoders` order); text-only
        encoders read ``prompts`` as they are. With ``slots`` equal to :meth:`slot_rows` of the single-token
        words at positions 1..N of ``prompts``, the result is :meth:`encode` of ``prompts``.
        """
        from erasekit.families.slots import constant, embedding_table, swapped_slots

        encoders = [enc for _, enc in self.slot_encoders(pipe)]
        parts = slots.split([embedding_table(enc).shape[1] for enc in encoders], dim=-1)
        with swapped_slots(encoders, parts), constant(self.text_only_encoders(pipe)):
            return self._encode(pipe, prompts)

    # -- latents through the family's own pipeline --

    def pipeline_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Extra arguments the pipeline's ``__call__`` needs to sample at :meth:`latent_shape` (the image size)."""
        return {}

    @torch.no_grad()
    def sample_latents(self, pipe: Any, prompts: Sequence[str], start: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
        """The pipeline's own sampler from ``start`` (a batch in :meth:`latent_shape`'s layout) to its final latents, same layout."""
        return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, latents=start, output_type="latent",
                    **self.pipeline_kwargs(pipe)).images

    def _vae_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents in :meth:`latent_shape`'s layout -> the VAE's (N x C x h x w)."""
        return latents

    @torch.no_grad()
    def decode_latents(self, pipe: Any, latents: torch.Tensor) -> np.ndarray:
        """uint8 images (N x H x W x 3) of latents in :meth:`latent_shape`'s layout (the VAE's scaling and shift undone)."""
        vae = pipe.vae
        z = self._vae_latents(pipe, latents) / vae.config.scaling_factor
        shift = vae.config.get("shift_factor")
        if shift:
            z = z + shift
        decoded = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return ((decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
