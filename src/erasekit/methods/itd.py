"""ItD, Interpret then Deactivate (Tian et al. 2025, arXiv 2503.09446): erase through a sparse autoencoder, no weight changed.

1. *Interpret*: a top-k SAE (:mod:`erasekit.methods.sae`) is trained on the token activations of one text-encoder
   layer over a prompt corpus (the toy world's captions, or a user's file). It is trained once per model and layer
   and cached; any concept is then a set of its features.
2. The concept's features: those most active on the concept's tokens (from the concept's word to the end of the
   prompt, where a causal text encoder carries it) and rarely active on the corpus prompts that do not name it. Two
   sets are chosen the same way: the *detector* (few, very specific: ``detect_features`` firing on at most
   ``detect_general_rate`` of other tokens) and the *deactivated* set (``n_features`` under ``max_general_rate``),
   which may be larger and less specific, because removing a concept can take more features than recognising it.
3. *Deactivate*: an inference-time hook encodes that layer's output, and for a prompt the SAE classifies as
   carrying the concept (the share of its SAE activation mass on the detector features exceeds a threshold,
   calibrated on the corpus) subtracts the deactivated features' decoded contribution, scaled:
   ``h - (1 - scale) z_F D_F``.
   Other prompts pass through bit for bit, which is the method's claim to preserve everything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError, SettingError
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress
from erasekit.methods.sae import TopKSAE, sae_from_tensors, sae_tensors, train_sae

TEMPLATES = ("{}", "an image of a {}", "a photo of a {}", "a picture of a {}", "a drawing of a {}")


@dataclass
class ItDConfig(MethodConfig):
    """ItD: a top-k SAE on one text-encoder layer; the concept's features are deactivated by a hook at inference."""

    corpus: str = field(default="", metadata={"help": "Prompt corpus the SAE learns from: 'toy' (the toy world's captions) or a text file, one prompt per line."})
    corpus_size: int = field(default=4000, metadata={"help": "Prompts drawn from the corpus (toy) or read from the file at most."})
    layer: int = field(default=-1, metadata={"help": "Text-encoder layer (from 0) whose output the SAE reads; -1: two thirds of the depth (ItD: layer 8 of CLIP-L's 12)."})
    expansion: int = field(default=8, metadata={"help": "SAE features per hidden unit (dictionary size / layer width)."})
    k: int = field(default=16, metadata={"help": "Active SAE features per token (top-k)."})
    sae_steps: int = field(default=3000, metadata={"help": "SAE training steps (Adam)."})
    sae_lr: float = field(default=4e-4, metadata={"help": "SAE learning rate."})
    sae_batch: int = field(default=1024, metadata={"help": "Activation rows per SAE step."})
    n_features: int = field(default=8, metadata={"help": "Features deactivated per concept."})
    max_general_rate: float = field(default=0.02, metadata={"help": "A deactivated feature may fire on at most this share of the tokens of prompts without the concept."})
    detect_features: int = field(default=8, metadata={"help": "Features per concept the classifier reads (the most specific ones)."})
    detect_general_rate: float = field(default=0.005, metadata={"help": "A detector feature may fire on at most this share of the tokens of prompts without the concept."})
    scale: float = field(default=0.0, metadata={"help": "Multiplier of the deactivated features (0: off, as ItD; negative pushes away)."})
    threshold: float = field(default=-1.0, metadata={"help": "Classifier threshold on the concept's share of SAE activation mass; -1: calibrated on the corpus."})
    selective: bool = field(default=True, metadata={"help": "Deactivate only in prompts the SAE classifies as carrying the concept (ItD's zero-shot classifier)."})

    def validate(self) -> None:
        """One-line refusals of values that cannot run."""
        from erasekit.checks import check_between as check_range

        super().validate()
        check_range("corpus_size", self.corpus_size, 2, 10**7)
        check_range("layer", self.layer, -1, 10**4)
        check_range("expansion", self.expansion, 1, 256)
        check_range("k", self.k, 1, 10**5)
        check_range("sae_steps", self.sae_steps, 1, 10**7)
        check_range("sae_lr", self.sae_lr, 1e-8, 1.0)
        check_range("sae_batch", self.sae_batch, 1, 10**6)
        check_range("n_features", self.n_features, 1, 10**5)
        check_range("max_general_rate", self.max_general_rate, 0.0, 1.0)
        check_range("detect_features", self.detect_features, 1, 10**5)
        check_range("detect_general_rate", self.detect_general_rate, 0.0, 1.0)
        check_range("scale", self.scale, -10.0, 1.0)
        if self.threshold != -1.0:
            check_range("threshold", self.threshold, 0.0, 1.0)


def layer_index(pipe: Pipeline, layer: int, encoder: str = "text_encoder") -> int:
    """``layer`` checked against the encoder's depth (-1: two thirds of it, from 0)."""
    from erasekit.hooks import encoder_layers

    depth = len(encoder_layers(getattr(pipe, encoder)))
    if layer == -1:
        return max(0, round(2 * depth / 3) - 1)
    if not 0 <= layer < depth:
        raise SettingError("layer", f"{{name}} is {layer}, but the text encoder has layers 0..{depth - 1}; pick one of them (or -1)")
    return layer


def corpus_prompts(config: ItDConfig) -> list[str]:
    """The prompts the SAE learns from: toy captions drawn with the run's seed, or the lines of the corpus file."""
    if config.corpus == "toy":
        from erasekit.world.captions import caption, sample_example
        from erasekit.world.vocab import load_vocab

        vocab, rng = load_vocab(), np.random.default_rng(config.seed)
        return [caption(*sample_example(rng, i, vocab), rng, vocab, pair_word_p=0.3) for i in range(config.corpus_size)]
    if not config.corpus:
        raise SettingError("corpus", "itd needs a prompt corpus: {name} 'toy' on the toy world, or a text file with one prompt per line")
    path = Path(config.corpus)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError("corpus", f"{{name}} {path} cannot be read as UTF-8 text ({exc.__class__.__name__}); pass a text file, one prompt per line") from None
    prompts = [line for line in lines if line][: config.corpus_size]
    if len(prompts) < 2:
        raise SettingError("corpus", f"{{name}} {path} holds {len(prompts)} prompt(s); the SAE needs a corpus of many prompts, one per line")
    return prompts


@torch.no_grad()
def layer_rows(pipe: Pipeline, prompts: Sequence[str], layer: int, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen layer's output for every prompt (N x T x width, float32) and each prompt's token ids (N x T)."""
    from erasekit.hooks import encoder_layers

    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    captured: list[torch.Tensor] = []

    def grab(module: Any, inputs: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output).detach().float().cpu())

    handle = encoder_layers(encoder).__getitem__(layer).register_forward_hook(grab)
    ids_all = []
    try:
        for s in range(0, len(prompts), batch_size):
            ids = tokenizer(list(prompts[s : s + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            encoder(ids.to(encoder.device))
            ids_all.append(ids)
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(ids_all)


def concept_mask(pipe: Pipeline, prompts: Sequence[str], ids: torch.Tensor, words: Sequence[str]) -> torch.Tensor:
    """N x T: positions from the first token of any of ``words`` in the prompt to the end (all False where none occurs)."""
    tokenizer = pipe.tokenizer
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    patterns = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    for row in range(ids.shape[0]):
        seq = ids[row].tolist()
        starts = [i for p in patterns if p for i in range(len(seq) - len(p) + 1) if seq[i : i + len(p)] == p]
        if starts:
            mask[row, min(starts) :] = True
    return mask


def concept_words(concept: str, toy: bool) -> list[str]:
    """The concept and, on the toy world, its synonyms (the corpus names objects by several words)."""
    if toy:
        from erasekit.world.vocab import load_vocab

        vocab = load_vocab()
        if concept in vocab.objects:
            return list(vocab.object_synonyms(concept))
    return [concept]


def select_features(z: torch.Tensor, mask: torch.Tensor, n: int, max_general: float) -> torch.Tensor:
    """The ``n`` features most active on the concept's positions among those firing on at most ``max_general`` of the rest."""
    target = z[mask]
    general = z[~mask.any(1, keepdim=True).expand_as(mask)]
    if target.shape[0] == 0:
        raise ErasekitError("no corpus prompt names the concept; add prompts that name it to the corpus")
    rate = (general > 0).float().mean(0) if general.shape[0] else torch.zeros(z.shape[-1])
    score = target.mean(0).masked_fill(rate > max_general, -1.0)
    chosen = score.topk(min(n, int((score > 0).sum()))).indices
    if chosen.numel() == 0:
        raise ErasekitError("every feature of the concept also fires on prompts without it; raise --max-general-rate or train a larger SAE")
    return chosen.sort().values


def concept_share(sae: TopKSAE, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per prompt (rows of B x T x width): the largest share, over its tokens, of SAE activation mass on ``features``."""
    z = sae.activations(hidden.float())
    return (z[..., features].sum(-1) / z.sum(-1).clamp_min(1e-8)).amax(-1)


def calibrate(share_with: torch.Tensor, share_without: torch.Tensor) -> float:
    """The threshold that best separates prompts with the concept from those without (balanced accuracy; midpoint)."""
    values = torch.cat([share_with, share_without]).unique().sort().values
    cuts = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2])
    acc = torch.stack([((share_with > c).float().mean() + (share_without <= c).float().mean()) / 2 for c in cuts])
    return float(cuts[int(acc.argmax())])


def sae_cache_key(pipe: Pipeline, config: ItDConfig, layer: int, prompts: Sequence[str]) -> str:
    """What decides a trained SAE: base weights, layer, SAE settings and the corpus."""
    from erasekit.models import weights_hash

    parts = [weights_hash(pipe), str(layer), *(str(getattr(config, f)) for f in ("expansion", "k", "sae_steps", "sae_lr", "sae_batch", "seed")),
             hashlib.sha256("\n".join(prompts).encode()).hexdigest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def trained_sae(pipe: Pipeline, config: ItDConfig, layer: int, prompts: Sequence[str], rows: torch.Tensor, progress: Progress | None) -> TopKSAE:
    """The SAE of this model, layer and corpus: from the cache if trained before, else trained now and cached."""
    from safetensors.torch import load_file, save

    from erasekit.eval.generate import default_cache_dir
    from erasekit.models import atomic_write_bytes

    path = default_cache_dir().parent / "sae" / f"{sae_cache_key(pipe, config, layer, prompts)}.safetensors"
    if path.is_file():
        try:
            return sae_from_tensors(load_file(str(path)), config.k, rows.shape[-1])
        except (ErasekitError, OSError, RuntimeError):
            pass  # a damaged cache entry: train again
    width = rows.shape[-1]

    def report(step: int, total: int, info: dict[str, Any]) -> None:
        if progress is not None and (step % 50 == 0 or step == total):
            progress(step, total, {"stage": "sae", **info})

    sae = train_sae(rows.reshape(-1, width), width * config.expansion, config.k, config.sae_steps, config.sae_lr, config.sae_batch,
                    config.seed, report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(sae_tensors(sae)))
    except OSError:
        pass  # an unwritable cache only costs the next run the training
    return sae


def fit_itd(pipe: Pipeline, request: ErasureRequest, config: ItDConfig, progress: Progress | None) -> Any:
    """Train (or reuse) the SAE, pick each target concept's features, and return the deactivating hook."""
    from erasekit.hooks import hook_result

    start = time.perf_counter()
    layer = layer_index(pipe, config.layer)
    prompts = corpus_prompts(config)
    hidden, ids = layer_rows(pipe, prompts, layer)
    sae = trained_sae(pipe, config, layer, prompts, hidden, progress)
    with torch.no_grad():
        z = sae.activations(hidden)
    toy = config.corpus == "toy"
    chosen, detect, masks = [], [], []
    for concept in request.targets:
        words = concept_words(concept, toy)
        mask = concept_mask(pipe, prompts, ids, words)
        z_all, m_all = z, mask
        if not mask.any():  # a concept the corpus never names: its own templated prompts stand in for the corpus's
            extra = [t.format(concept) for t in TEMPLATES]
            h_extra, ids_extra = layer_rows(pipe, extra, layer)
            with torch.no_grad():
                z_extra = sae.activations(h_extra)
            m_extra = concept_mask(pipe, extra, ids_extra, [concept])
            z_all, m_all = torch.cat([z, z_extra]), torch.cat([mask, m_extra])
        chosen.append(select_features(z_all, m_all, config.n_features, config.max_general_rate))
        try:
            detect.append(select_features(z_all, m_all, config.detect_features, config.detect_general_rate))
        except ErasekitError:  # no feature is that specific (a small SAE): the deactivated set's most specific ones detect
            detect.append(select_features(z_all, m_all, config.detect_features, config.max_general_rate))
        masks.append(mask.any(1))
    features, detectors = torch.cat(chosen).unique(), torch.cat(detect).unique()
    threshold = config.threshold
    if threshold == -1.0:
        with torch.no_grad():
            share = concept_share(sae, hidden, detectors)
        has = torch.stack(masks).any(0)
        threshold = calibrate(share[has], share[~has]) if has.any() and (~has).any() else 0.0
    tensors = {**sae_tensors(sae), "features": features.to(torch.int64), "detect": detectors.to(torch.int64)}
    settings = {"k": config.k, "scale": config.scale, "threshold": threshold, "selective": config.selective}
    result = hook_result(pipe, "itd", tensors, request.targets, layer=layer, settings=settings, method="itd")
    return dataclasses.replace(result, config=dataclasses.asdict(config), preserve=tuple(request.preserve),
                               timings={"erase_s": time.perf_counter() - start})


def build_itd_hook(tensors: dict[str, torch.Tensor], settings: dict[str, Any], width: int) -> Any:
    """The hook's transform: for prompts classified as carrying the concept, ``h - (1 - scale) z_F D_F`` at every token.

    The classifier reads the ``detect`` features (a file without them, from before they were separate, reads ``features``).
    """
    unknown = sorted(set(settings) - {"k", "scale", "threshold", "selective"})
    if unknown or "features" not in tensors:
        raise ErasekitError(f"an itd hook needs the SAE tensors, 'features' and the settings k, scale, threshold, selective (got extra {unknown})")
    try:
        k, scale, threshold, selective = int(settings["k"]), float(settings["scale"]), float(settings["threshold"]), bool(settings["selective"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ErasekitError(f"the itd hook's settings are damaged ({exc}); erase again") from None
    sae = sae_from_tensors(tensors, k, width)
    features, detectors = tensors["features"].long(), tensors.get("detect", tensors["features"]).long()
    for named in (features, detectors):
        if named.numel() == 0 or int(named.min()) < 0 or int(named.max()) >= sae.decoder.shape[1]:
            raise ErasekitError("the itd hook names features its SAE does not have; the delta is damaged")
    atoms = sae.decoder.detach()[:, features]

    sae.requires_grad_(False)

    def transform(hidden: torch.Tensor) -> torch.Tensor:  # differentiable in ``hidden``: the attack searches through it
        nonlocal atoms, features, detectors
        x = hidden.float()
        if atoms.device != x.device:  # the SAE follows the encoder to wherever the pipeline was moved
            sae.to(x.device)
            atoms, features, detectors = atoms.to(x.device), features.to(x.device), detectors.to(x.device)
        z = sae.activations(x)
        zf = z[..., features]
        removed = (1.0 - scale) * zf @ atoms.t()
        if selective:
            share = (z[..., detectors].sum(-1) / z.sum(-1).clamp_min(1e-8)).amax(-1)
            removed = removed * (share > threshold).to(x.dtype)[:, None, None]
        return (x - removed).to(hidden.dtype)

    return transform


def classify(pipe: Pipeline, result: Any, prompts: Sequence[str]) -> list[tuple[str, float, bool]]:
    """ItD's zero-shot classifier: (prompt, concept share, carries the concept?) for each prompt, by the result's SAE."""
    if result.kind != "hook" or result.hook.get("type") != "itd":
        raise ErasekitError(f"this is a {result.method} delta, not an itd one; classify needs the delta `erasekit erase --method itd` wrote")
    width = int(result.delta["sae.w_enc"].shape[1])
    sae = sae_from_tensors(result.delta, int(result.hook["settings"]["k"]), width)
    hidden, _ = layer_rows(pipe, list(prompts), int(result.hook["layer"]))
    if hidden.shape[-1] != width:
        raise ErasekitError(f"this itd delta's SAE reads {width}-wide activations but the model's layer is {hidden.shape[-1]} wide; it was made for another model")
    with torch.no_grad():
        share = concept_share(sae, hidden, result.delta.get("detect", result.delta["features"]).long())
    threshold = float(result.hook["settings"]["threshold"])
    return [(p, float(s), bool(s > threshold)) for p, s in zip(prompts, share)]
