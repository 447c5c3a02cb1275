"""A top-k sparse autoencoder over a text encoder's token activations (ItD's interpreter).

The k-sparse autoencoder of Makhzani & Frey (2013) as ItD uses it (Tian et al. 2025, §3.1): an input row ``x``
(one token's hidden state at one layer) is encoded as ``z = topk(relu(W_enc (x - b_pre) + b_enc))`` (only the
``k`` largest activations kept) and decoded as ``x_hat = W_dec z + b_pre``, with unit-norm decoder columns (the
features). Trained on mean squared error normalised by the inputs' variance; the decoder columns are renormalised
after every step. Written by hand (a few dozen lines; no maintained package ships a top-k SAE for torch 2.13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erasekit.errors import ErasekitError


@dataclass(frozen=True)
class SAEStats:
    """How well a trained SAE reconstructs held-out rows: the fraction of variance it leaves unexplained."""

    unexplained: float
    dead_fraction: float


class TopKSAE(nn.Module):
    """A top-k sparse autoencoder of ``width``-dimensional rows with ``features`` dictionary atoms."""

    def __init__(self, width: int, features: int, k: int) -> None:
        super().__init__()
        if not 0 < k <= features:
            raise ErasekitError(f"the SAE keeps k={k} of {features} features; k must be between 1 and the number of features")
        self.k = k
        self.b_pre = nn.Parameter(torch.zeros(width))
        self.encoder = nn.Linear(width, features)
        self.decoder = nn.Parameter(torch.empty(width, features))

    def init_from(self, rows: torch.Tensor, generator: torch.Generator) -> None:
        """Start from random unit features, the encoder tied to the decoder, and ``b_pre`` at the rows' median."""
        with torch.no_grad():
            atoms = torch.randn(self.decoder.shape, generator=generator)
            self.decoder.copy_(atoms / atoms.norm(dim=0, keepdim=True))
            self.encoder.weight.copy_(self.decoder.t())
            self.encoder.bias.zero_()
            self.b_pre.copy_(rows.median(dim=0).values)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse code ``z`` of rows ``x`` (... x width -> ... x features; k non-zeros per row at most)."""
        pre = torch.relu(self.encoder(x - self.b_pre))
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Rows rebuilt from codes."""
        return z @ self.decoder.t() + self.b_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``."""
        return self.decode(self.activations(x))

    @torch.no_grad()
    def normalise(self) -> None:
        """Rescale every feature (decoder column) to unit norm."""
        self.decoder.div_(self.decoder.norm(dim=0, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def stats(self, rows: torch.Tensor) -> SAEStats:
        """Unexplained variance and dead-feature fraction on ``rows``."""
        z = self.activations(rows)
        err = (self.decode(z) - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
        return SAEStats(float(err), float((z > 0).sum(0).eq(0).float().mean()))


def train_sae(
    rows: torch.Tensor, features: int, k: int, steps: int, lr: float, batch_size: int, seed: int,
    progress: object | None = None,
) -> TopKSAE:
    """Fit a :class:`TopKSAE` to ``rows`` (N x width, float32) with Adam; deterministic for a seed on one CPU."""
    if rows.ndim != 2 or rows.shape[0] < batch_size:
        raise ErasekitError(f"the SAE needs at least one batch of {batch_size} activation rows, got {tuple(rows.shape)}; use a larger prompt corpus")
    generator = torch.Generator().manual_seed(seed)
    sae = TopKSAE(rows.shape[1], features, k)
    sae.init_from(rows, generator)
    scale = (rows - rows.mean(0)).pow(2).sum(1).mean()
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        batch = rows[torch.randint(rows.shape[0], (batch_size,), generator=generator)]
        loss = (sae(batch) - batch).pow(2).sum(1).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalise()
        if callable(progress):
            progress(step + 1, steps, {"loss": float(loss.detach())})
    return sae.eval()


def sae_tensors(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """The SAE's weights under the names a saved ItD hook uses."""
    return {"sae.w_enc": sae.encoder.weight.detach().clone(), "sae.b_enc": sae.encoder.bias.detach().clone(),
            "sae.w_dec": sae.decoder.detach().clone(), "sae.b_pre": sae.b_pre.detach().clone()}


def sae_from_tensors(tensors: dict[str, torch.Tensor], k: int, width: int) -> TopKSAE:
    """Rebuild a :class:`TopKSAE` from :func:`sae_tensors`, refusing one made for another width."""
    try:
        w_enc = tensors["sae.w_enc"]
        sae = TopKSAE(int(w_enc.shape[1]), int(w_enc.shape[0]), k)
        if w_enc.shape[1] != width:
            raise ErasekitError(f"this SAE reads {w_enc.shape[1]}-wide activations but the layer is {width} wide; "
                                "it was trained on another model: train one on this model")
        sae.load_state_dict({"encoder.weight": w_enc, "encoder.bias": tensors["sae.b_enc"], "decoder": tensors["sae.w_dec"],
                             "b_pre": tensors["sae.b_pre"]})
    except (KeyError, RuntimeError) as exc:
        raise ErasekitError(f"the saved SAE is incomplete or damaged ({exc}); train it again") from None
    return sae.eval()
