"""Closed-form edits of the linear maps that read the text conditioning, shared by UCE and RECE (DESIGN.md §3b).

Which maps those are is the family's (:meth:`Family.closed_form_weights`): every cross-attention
``attn2.to_k``/``to_v`` of a UNet (SD, SDXL), the transformer's ``context_embedder`` on SD3 and FLUX.1
(their joint attention re-computes the text stream in every block, so the embedder is the one map applied
to the encoders' states). Keys are rows of the family's ``hidden`` conditioning. Every function here is a
pure function of tensors: the edited matrices are returned, never written into a model. Solves run in
float64 and are cast back to the weights' dtype at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erasekit.concepts import encode
from erasekit.errors import ErasekitError
from erasekit.families import Family, family_of, get_family
from erasekit.families.base import Pipeline

KEY_ROWS = ("last-token", "through-eos")
OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
ART_TEMPLATES = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")


def _family_and_model(target: Pipeline | nn.Module) -> tuple[Family, nn.Module]:
    """A pipeline's family and denoiser; a bare denoiser is a flow transformer if it has a context_embedder, else a UNet."""
    if isinstance(target, nn.Module):
        return get_family("sd3" if hasattr(target, "context_embedder") else "sd"), target
    family = family_of(target)
    return family, family.denoiser(target)


def edit_matrices(target: Pipeline | nn.Module, keys: bool = True) -> dict[str, torch.Tensor]:
    """The weights a closed-form edit changes (a pipeline's or a bare denoiser's), by parameter name."""
    family, model = _family_and_model(target)
    return family.closed_form_weights(model, keys)


def weights_of(target: Pipeline | nn.Module, keys: bool = True) -> dict[str, torch.Tensor]:
    """Detached float64 copies of the editable matrices, keyed by parameter name (``<module>.weight``)."""
    return {name: w.detach().to(torch.float64).clone() for name, w in edit_matrices(target, keys).items()}


def last_token_index(pipe: Pipeline, text: str) -> int:
    """Row of the text's last word token in the first text part of ``hidden`` (CLIP's on SD3; 0 for '')."""
    return family_of(pipe).last_token_rows(pipe, text)[0]


@torch.no_grad()
def encoder_rows(pipe: Pipeline, texts: list[str]) -> torch.Tensor:
    """The family's ``hidden`` conditioning (N x rows x d: 77 on SD/SDXL, 77 + 256 on SD3, 512 on FLUX.1), float64 on the CPU."""
    return encode(pipe, texts).to(device="cpu", dtype=torch.float64)


def last_token_rows(pipe: Pipeline, texts: list[str]) -> torch.Tensor:
    """The last word token's row of each text part (UCE's new code), text by text: one key per text, two on SD3 (CLIP, T5)."""
    if not texts:
        return torch.empty(0)
    family, emb = family_of(pipe), encoder_rows(pipe, texts)
    return torch.cat([emb[i, list(family.last_token_rows(pipe, t))] for i, t in enumerate(texts)])


def aligned_rows(pipe: Pipeline, concept: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE's old code: in each text part, rows from each text's last word token through EOS and padding, aligned row by row."""
    family, emb = family_of(pipe), encoder_rows(pipe, [concept, guide])
    concept_rows, guide_rows = [], []
    for i_c, i_g, end in zip(family.last_token_rows(pipe, concept), family.last_token_rows(pipe, guide), family.part_ends(pipe)):
        farthest = max(i_c, i_g)
        concept_rows.append(emb[0, i_c : end - (farthest - i_c)])
        guide_rows.append(emb[1, i_g : end - (farthest - i_g)])
    return torch.cat(concept_rows), torch.cat(guide_rows)


@dataclass(frozen=True)
class EditRows:
    """The rows of one closed-form edit: keys to move, their guide rows, and keys to keep (all float64, d wide)."""

    erase_keys: torch.Tensor
    guide_rows: torch.Tensor
    preserve_keys: torch.Tensor


def edit_rows(pipe: Pipeline, erase: list[str], guides: list[str], preserve: list[str], key_rows: str) -> EditRows:
    """Build the key rows of a UCE edit from prompts, in either of the reference's two conventions."""
    if key_rows not in KEY_ROWS:
        raise ErasekitError(f"unknown key_rows {key_rows!r}; choose one of: {', '.join(KEY_ROWS)}")
    d = family_of(pipe).key_width(pipe)  # the keys' width: SDXL's two encoders side by side, the T5 width on SD3/FLUX.1
    if key_rows == "last-token":
        erase_keys, guide_rows = last_token_rows(pipe, erase), last_token_rows(pipe, guides)
        preserve_keys = last_token_rows(pipe, preserve) if preserve else torch.zeros(0, d, dtype=torch.float64)
    else:
        pairs = [aligned_rows(pipe, c, g) for c, g in zip(erase, guides)]
        erase_keys = torch.cat([p[0] for p in pairs])
        guide_rows = torch.cat([p[1] for p in pairs])
        # the old code keeps all 77 rows of every retained prompt (every row of ``hidden`` on any family)
        preserve_keys = encoder_rows(pipe, preserve).flatten(0, 1) if preserve else torch.zeros(0, d, dtype=torch.float64)
    return EditRows(erase_keys, guide_rows, preserve_keys)


def uce_edit(
    weights: dict[str, torch.Tensor], rows: EditRows, lam: float, erase_scale: float, preserve_scale: float
) -> dict[str, torch.Tensor]:
    """UCE (Gandikota et al., WACV 2024, eq. 7) on every matrix W, with v* = W c_guide ("replace"):

    W_new = (lam W + s_e sum_i W g_i c_iᵀ + s_p sum_j W c_j c_jᵀ)(lam I + s_e sum_i c_i c_iᵀ + s_p sum_j c_j c_jᵀ)⁻¹.
    ``weights`` are the matrices being edited (W0 for UCE, the current W' for RECE's accumulating rounds).
    """
    k_e, g, k_p = rows.erase_keys, rows.guide_rows, rows.preserve_keys
    d = k_e.shape[1]
    # both sums are linear in W: W (s_e Gᵀ K_e + s_p K_pᵀ K_p), so one d x d pair serves every matrix
    right = erase_scale * g.T @ k_e + preserve_scale * k_p.T @ k_p
    gram = lam * torch.eye(d, dtype=torch.float64) + erase_scale * k_e.T @ k_e + preserve_scale * k_p.T @ k_p
    out = {}
    for name, w in weights.items():
        w = w.to(torch.float64)
        dev = w.device
        numerator = lam * w + w @ right.to(dev)
        # X gram = numerator  <=>  gram X^T = numerator^T (gram is symmetric)
        out[name] = torch.linalg.solve(gram.to(dev), numerator.T).T
    return out


def residuals(edited: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rows: EditRows) -> tuple[float, float]:
    """(erase_loss, preserve_loss): mean squared |W c_i - W_ref g_i| and |W c_j - W_ref c_j| over every matrix."""
    erase = preserve = 0.0
    for name, w in edited.items():
        ref = reference[name].to(w)
        erase += float(((rows.erase_keys.to(w) @ w.T - rows.guide_rows.to(w) @ ref.T) ** 2).mean())
        if len(rows.preserve_keys):
            k_p = rows.preserve_keys.to(w)
            preserve += float(((k_p @ w.T - k_p @ ref.T) ** 2).mean())
    return erase / len(edited), preserve / len(edited)


def relative_change(weights: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> float:
    """The largest |W - W0| / |W0| over the edited matrices (a size-of-edit figure for the history)."""
    return round(max(float((weights[n] - original[n]).norm() / original[n].norm()) for n in weights), 6)


def derive_embedding(current: dict[str, torch.Tensor], original: dict[str, torch.Tensor], emb: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE (Gong et al., ECCV 2024): the embedding that still regenerates the concept under the edited weights,

    c' = (reg I + sum_l W'_lᵀ W'_l)⁻¹ (sum_l W'_lᵀ W0_l) c, the minimiser of sum_l |W'_l c' - W0_l c|² + reg |c'|²,
    applied to every row of ``emb`` (R x d).
    """
    names = sorted(current)
    d = current[names[0]].shape[1]
    dev = current[names[0]].device
    lhs = reg * torch.eye(d, dtype=torch.float64, device=dev)
    rhs = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for name in names:
        w_now, w_0 = current[name].to(torch.float64), original[name].to(torch.float64)
        lhs = lhs + w_now.T @ w_now
        rhs = rhs + w_now.T @ w_0
    coefficient = torch.linalg.solve(lhs, rhs)
    return emb.to(torch.float64).to(dev) @ coefficient.T


def as_delta(weights: dict[str, torch.Tensor], like: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The edited matrices as an ErasureResult delta: ``<prefix>.<param>`` keys (the family's), ``like``'s dtype, on CPU."""
    params = dict(like.named_parameters())
    return {f"{prefix}.{n}": w.to(dtype=params[n].dtype, device="cpu").contiguous() for n, w in weights.items()}


@torch.no_grad()
def applied(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``weights`` into the denoiser ``model`` and return the previous values (to put back with another call)."""
    params = dict(model.named_parameters())
    previous = {n: params[n].detach().clone() for n in weights}
    for n, w in weights.items():
        params[n].copy_(w.to(dtype=params[n].dtype, device=params[n].device))
    return previous
