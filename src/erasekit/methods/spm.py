"""SPM, the one-dimensional adapter (Lyu et al., CVPR 2024, arXiv 2312.16145): erase into a rank-1 membrane, gated per prompt.

1. *Membrane*: a rank-1 adapter (PEFT LoRA of rank 1) on every linear and conv layer of the UNet, the base frozen.
2. *Erasure*: ESD's objective through the adapter (the negatively guided prediction of the frozen model).
3. *Latent anchoring*: each step also keeps the adapted model's prediction on an anchor prompt equal to the
   frozen model's (weight ``preserve_weight``; the paper's 1,000), the anchors sampled from a concept vocabulary
   with no data: the tokenizer's whole-word tokens, the toy world's words, or a user's file; the empty prompt is
   always one of them.
4. *Facilitated transport* at inference (:mod:`erasekit.methods.spm_adapter`): the result is an inference-time
   hook on the UNet whose per-prompt strength follows the prompt's similarity to the concept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erasekit.errors import ErasekitError, SettingError
from erasekit.families import Cond
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig
from erasekit.result import ErasureResult

TEMPLATES = ("{}", "an image of a {}", "a photo of a {}", "a picture of a {}", "a drawing of a {}")
KEY_CONTEXTS = 16  # anchor words used as context around the concept for the gate's keys


@dataclass
class SPMConfig(TrainConfig):
    """SPM: a rank-1 adapter on the UNet's linear and conv layers, ESD's erasure, latent anchoring, facilitated transport."""

    iterations: int = field(default=3000, metadata={"help": "Model update steps (SPM: 3,000)."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the adapter (SPM: 1e-4)."})
    train_method: str = field(default="lora", metadata={"help": "Always lora: the rank-1 membrane (SPM trains only the adapter)."})
    lora_rank: int = field(default=1, metadata={"help": "Adapter rank (SPM: 1, the one-dimensional adapter)."})
    preserve_weight: float = field(default=1000.0, metadata={"help": "Latent-anchoring weight (SPM: 1,000)."})
    anchors: str = field(default="vocab", metadata={"help": "Anchor concepts: vocab (the tokenizer's whole words), toy (the toy world's words), or a text file, one per line."})
    n_anchors: int = field(default=64, metadata={"help": "Anchor concepts sampled (the empty prompt is added)."})
    transport: bool = field(default=True, metadata={"help": "Facilitated transport: gate the adapter per prompt by its similarity to the concept (off: full strength everywhere)."})
    gate_margin: float = field(default=0.5, metadata={"help": "The gate reaches full strength this share of the way from the most similar anchor to a perfect match."})
    strength: float = field(default=1.0, metadata={"help": "Adapter strength at a full gate."})

    def validate(self) -> None:
        """One-line refusals of values that cannot run."""
        from erasekit.checks import check_between

        super().validate()
        if self.train_method != "lora":
            raise SettingError("train_method", "spm trains only its rank-1 adapter: {name} must be lora")
        check_between("lora_rank", self.lora_rank, 1, 64)
        check_between("n_anchors", self.n_anchors, 1, 10**5)
        check_between("gate_margin", self.gate_margin, 1e-3, 1.0)
        check_between("strength", self.strength, 0.0, 10.0)


def adapter_targets(unet: nn.Module) -> list[str]:
    """Every linear and conv layer of the UNet, by full name (SPM's membranes)."""
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def anchor_concepts(pipe: Pipeline, config: SPMConfig, targets: list[str]) -> list[str]:
    """The anchor concepts: sampled with the run's seed from the vocabulary, none naming a target; the empty prompt first."""
    own = {w.lower() for t in targets for w in t.split()}
    if config.anchors == "toy":
        from erasekit.world.vocab import load_vocab

        vocab = load_vocab()
        synonyms = {s.lower() for t in targets if t in vocab.objects for s in vocab.object_synonyms(t)}
        pool = [o for o in vocab.objects if o not in own and o not in synonyms] + vocab.colours + vocab.styles
    elif config.anchors == "vocab":
        words = (w.removesuffix("</w>") for w in pipe.tokenizer.get_vocab() if w.endswith("</w>"))
        pool = sorted(w for w in words if w.isalpha() and len(w) >= 3 and w.lower() not in own)
    else:
        try:
            pool = [line.strip() for line in Path(config.anchors).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingError("anchors", f"{{name}} {config.anchors} cannot be read as UTF-8 text ({exc.__class__.__name__}); pass vocab, toy, or a text file, one concept per line") from None
        pool = [p for p in pool if p.lower() not in own]
    if not pool:
        raise SettingError("anchors", "{name} gives no concept other than the target; add anchor concepts")
    rng = np.random.default_rng(config.seed)
    picked = [pool[i] for i in rng.choice(len(pool), size=min(config.n_anchors, len(pool)), replace=False)]
    return ["", *picked]


@torch.no_grad()
def prompt_states(pipe: Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's output for ``prompts`` (N x T x width) and their token ids."""
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu(), ids


def key_prompts(targets: list[str], anchors: list[str]) -> tuple[list[str], list[str]]:
    """Prompts that carry each concept in varied contexts (templates, and each anchor word before and after it), with their concept."""
    words = [a for a in anchors if a][:KEY_CONTEXTS]
    forms = [*TEMPLATES, *(f"a {w} {{}}" for w in words), *(f"{{}}, {w}" for w in words)]
    pairs = [(f.format(c), c) for c in targets for f in forms]
    return [p for p, _ in pairs], [c for _, c in pairs]


def gate_keys(pipe: Pipeline, targets: list[str], anchors: list[str]) -> torch.Tensor:
    """The concepts' own token states in varied contexts, from each concept's first token through the end-of-text token.

    A causal encoder's state of a word depends on the words before it, so the keys cover several contexts.
    """
    prompts, concepts = key_prompts(targets, anchors)
    states, ids = prompt_states(pipe, prompts)
    eos = pipe.tokenizer.eos_token_id
    keys = []
    for row, concept in enumerate(concepts):
        word = pipe.tokenizer(concept, add_special_tokens=False).input_ids
        seq = ids[row].tolist()
        start = next((i for i in range(1, len(seq)) if seq[i : i + len(word)] == word), 1)
        end = seq.index(eos, 1) if eos in seq[1:] else len(seq) - 1
        keys.append(states[row, start : end + 1])
    return torch.cat(keys)


def calibrate_gate(pipe: Pipeline, keys: torch.Tensor, anchors: list[str], margin: float) -> tuple[float, float]:
    """(low, high): the gate is 0 up to the most similar anchor (the empty prompt included) and full ``margin`` of the way to 1."""
    from erasekit.methods.spm_adapter import gate_similarity

    low = float(gate_similarity(prompt_states(pipe, anchors)[0], keys).max())
    low = min(low, 1.0 - 1e-3)
    return low, low + margin * (1.0 - low)


def fit_spm(pipe: Pipeline, request: ErasureRequest, config: SPMConfig, progress: Progress | None) -> ErasureResult:
    """Train the membrane with ESD's erasure and latent anchoring; return it as a prompt-gated UNet hook."""
    from erasekit.hooks import hook_result
    from erasekit.methods.loop import finetune
    from erasekit.methods.trainer import prepare

    if request.preserve:
        raise ErasekitError("spm preserves through latent anchoring on sampled concepts; pass anchors with --set anchors=FILE instead of --preserve")
    anchors = anchor_concepts(pipe, config, list(request.targets))
    req = dataclasses.replace(request, preserve=tuple(anchors[1:]))
    s = prepare(pipe, req, config, lora_targets=adapter_targets(pipe.unet))
    assert s.emb_preserve is not None
    s.preserve, s.emb_preserve = anchors, Cond.cat([s.emb_null, s.emb_preserve])  # the empty prompt anchors too
    keys = gate_keys(pipe, list(s.targets), anchors)  # before the run may release the text encoder
    low, high = calibrate_gate(pipe, keys, anchors, config.gate_margin)
    trained = finetune(pipe, req, config, progress, method="spm", loss_space="eps", setup=s)
    tensors = {"gate.keys": keys, **membranes(trained.delta)}
    settings = {"transport": config.transport, "low": low, "high": high, "strength": config.strength}
    result = hook_result(pipe, "spm", tensors, request.targets, encoder="unet", layer=0, settings=settings, method="spm",
                         base_hash=trained.base_hash)
    return dataclasses.replace(result, config=dataclasses.asdict(config), preserve=(), history=trained.history,
                               timings={**trained.timings, "anchors": float(len(anchors))})


def membranes(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA keys (``unet.<module>.lora.down.weight`` or PEFT's ``lora_A``) as the hook's ``<module>.down`` / ``<module>.up``."""
    out = {}
    for key, value in lora.items():
        for half, names in (("down", (".lora.down.weight", ".lora_A.weight")), ("up", (".lora.up.weight", ".lora_B.weight"))):
            for suffix in names:
                if key.endswith(suffix):
                    out[f"{key.removeprefix('unet.').removesuffix(suffix)}.{half}"] = value
    if len(out) != len(lora):
        raise ErasekitError(f"the trained adapter has {len(lora)} tensors but {len(out)} are membrane halves; unexpected LoRA keys")
    return out


def with_transport(result: Any, on: bool) -> Any:
    """The same SPM result with facilitated transport switched on or off (no retraining; the gate is a setting)."""
    if result.kind != "hook" or result.hook.get("type") != "spm":
        raise ErasekitError(f"this is a {result.method} delta, not an spm one; transport is a setting of SPM adapters")
    hook = {**result.hook, "settings": {**result.hook["settings"], "transport": bool(on)}}
    return dataclasses.replace(result, hook=hook)
