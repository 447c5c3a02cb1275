"""The paper's metrics (DESIGN.md §4) as pure functions of arrays: ESR/PSR, detection rates (NER), FID, scores.

Every function here takes per-image outputs that were already computed, so its value cannot depend on
the batch size the upstream model was called with.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import linalg

from erasekit.errors import ErasekitError

THRESHOLDS = (0.3, 0.5, 0.7, 0.8)


def topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether its true label is among the classifier's top-k (ties broken by lower index)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ErasekitError(f"expected probabilities N x C and N labels, got {probs.shape} and {labels.shape}")
    if not 1 <= k <= probs.shape[1]:
        raise ErasekitError(f"top-{k} asked for, but the classifier has {probs.shape[1]} classes")
    # a label's rank = how many classes beat it (strictly, or equal with a lower index)
    own = probs[np.arange(len(labels)), labels][:, None]
    index = np.arange(probs.shape[1])[None, :]
    better = (probs > own) | ((probs == own) & (index < labels[:, None]))
    return better.sum(axis=1) < k


def _percent(mask: np.ndarray) -> float | None:
    return float(100.0 * mask.mean()) if mask.size else None


def esr_psr(probs: np.ndarray, labels: Sequence[int] | np.ndarray, erased: Iterable[int], k: int) -> dict:
    """ESR-k: % of erased-class images whose class is NOT in the top-k; PSR-k: % of preserved-class images whose class IS.

    Also the per-class rate (ESR-k for an erased class, PSR-k for a preserved one). A side with no
    images is ``None``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    erased = set(int(e) for e in erased)
    hits = topk_hits(probs, labels, k)
    is_erased = np.isin(labels, sorted(erased)) if erased else np.zeros(len(labels), bool)
    per_class: dict[int, float] = {}
    for cls in sorted(set(labels.tolist())):
        sel = labels == cls
        rate = _percent(~hits[sel]) if cls in erased else _percent(hits[sel])
        per_class[int(cls)] = float(rate)  # type: ignore[arg-type]
    return {
        "k": k,
        "esr": _percent(~hits[is_erased]),
        "psr": _percent(hits[~is_erased]),
        "per_class": per_class,
    }


def classification_table(probs: np.ndarray, labels: Sequence[int] | np.ndarray, erased: Iterable[int], ks: Sequence[int] = (1, 5)) -> dict:
    """ESR-k and PSR-k for every k, keyed as the paper names them (ESR-1, ESR-5, PSR-1, PSR-5), plus per-class rates."""
    erased = set(erased)
    out: dict = {"headline": {}, "per_class": {}}
    for k in ks:
        rates = esr_psr(probs, labels, erased, k)
        out["headline"][f"ESR-{k}"] = rates["esr"]
        out["headline"][f"PSR-{k}"] = rates["psr"]
        out["per_class"][f"top-{k}"] = rates["per_class"]
    out["headline"] = {key: out["headline"][key] for key in sorted(out["headline"])}
    return out


def detection_rate(scores: Sequence[float] | np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """NER@t: % of images whose detector score is >= t, for each threshold t (the threshold is the key)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ErasekitError("no images to measure a detection rate on")
    return {float(t): float(100.0 * np.mean(scores >= t)) for t in thresholds}


def max_exposed_score(detections: Sequence[Mapping], classes: Iterable[str]) -> float:
    """The highest score among detections of the given classes (0 when there is none): one image's NER score."""
    wanted = set(classes)
    return max((float(d["score"]) for d in detections if d.get("class") in wanted), default=0.0)


def mean_score(scores: Sequence[float] | np.ndarray) -> float:
    """The mean of per-image scores (style score, CLIP score); ``nan`` never hides: empty input is an error."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ErasekitError("no images to average a score over")
    return float(scores.mean())


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-image CLIP score, 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics computes it)."""
    a = np.asarray(image_embeds, dtype=np.float64)
    b = np.asarray(text_embeds, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return 100.0 * np.maximum(cos, 0.0)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N x D features, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ErasekitError(f"FID needs at least 2 feature vectors (N x D), got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (Heusel et al. 2017), as pytorch-fid computes it."""
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # few images in many dimensions give a singular product; handled below, as pytorch-fid does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # tiny imaginary parts are numerical noise of sqrtm; large ones mean the input was not a covariance
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, float(np.abs(covmean).max()))):
            raise ErasekitError(f"FID: the matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(max(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean), 0.0))


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between two sets of image features (judge features on the toy world, Inception/CLIP on real models)."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ErasekitError(f"FID: feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    return frechet_distance(mu1, s1, mu2, s2)
