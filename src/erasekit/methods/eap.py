"""EAP (Bui et al., NeurIPS 2024): erase while preserving the concept the erasure hurts most.

A Gumbel-Softmax distribution over candidate concepts is trained to *maximise* the preservation loss
while the model minimises erase + lambda * preserve (DESIGN.md §3). ``eap-pgd`` searches a continuous
embedding instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.concepts import concept_space, distances, encode_cond, select_candidates
from erasekit.errors import ErasekitError
from erasekit.families import Cond
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig
from erasekit.methods.loop import finetune
from erasekit.models import model_id
from erasekit.result import ErasureResult

PRESERVE_CHOICES = ("adversarial", "random", "nearest", "none")


@dataclass
class EAPConfig(TrainConfig):
    """EAP settings; defaults are the paper's / reference code's for objects and artists."""

    concept_space: str = field(default="auto", metadata={"help": "Concepts to search: toy, clip, or a word-list file; auto = toy on the toy model, clip otherwise (the reference's EN3K list is not shipped)."})
    k: int = field(default=1000, metadata={"help": "K nearest concepts by L2 over full text embeddings (reference: 1000 objects/artists, 2000 nudity)."})
    n_centres: int = field(default=100, metadata={"help": "KMeans centres over the distances; one candidate per centre (reference: 100, 50 for nudity)."})
    gumbel_temperature: float = field(default=2.0, metadata={"help": "Temperature of the hard straight-through Gumbel-Softmax (reference: 2)."})
    gumbel_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the search logits (reference: 1e-2)."})
    rollout_reuse: int = field(default=1, metadata={"help": "Model steps that reuse one rollout's x_t (fast path; 1 = a fresh rollout every step as the reference, which keeps its erasure; 2+ is faster but erases harder on the toy world)."})
    rollout_share: int = field(default=1, metadata={"help": "Model steps whose x_t come from one DDIM trajectory, each at its own timestep (fast path; one rollout to the largest k)."})
    faithful: bool = field(default=False, metadata={"help": "Follow the reference's cost structure: a frozen second copy, fresh rollouts every iteration, alternating model/search steps (the yardstick)."})
    kmeans_n_init: int = field(default=1, metadata={"help": "k-means++ initialisations when thinning the K nearest into candidates; 1 = the reference's KMeans(random_state=0) as scikit-learn >= 1.4 runs it (n_init='auto'; 10 before 1.4)."})
    preserve_choice: str = field(default="adversarial", metadata={"help": "Which candidate is preserved (the paper's ablation): adversarial (Gumbel search, EAP), random (a uniform draw from the same candidates each step), nearest (the candidate closest to the target, fixed), none (no preservation term: ESD's objective in EAP's x0 loss space)."})

    def validate(self) -> None:
        """Check the search settings too."""
        super().validate()
        if self.preserve_choice not in PRESERVE_CHOICES:
            raise ErasekitError(f"unknown preserve_choice {self.preserve_choice!r}; choose one of: {', '.join(PRESERVE_CHOICES)}")
        from erasekit.checks import MAX_ITERATIONS, MAX_LR, check_between
        from erasekit.errors import SettingError

        for name in ("kmeans_n_init", "k", "n_centres", "rollout_reuse", "rollout_share"):
            check_between(name, getattr(self, name), 1, MAX_ITERATIONS)
        if not 0 < self.gumbel_temperature < math.inf:
            raise SettingError("gumbel_temperature", f"{{name}} must be a positive finite number, got {self.gumbel_temperature}")
        if not 0 < self.gumbel_lr < math.inf:
            raise SettingError("gumbel_lr", f"{{name}} must be a positive finite number (the search's Adam step), got {self.gumbel_lr}")
        check_between("gumbel_lr", self.gumbel_lr, 0.0, MAX_LR, low_open=True, why="the search's Adam step; the reference uses 1e-2")


@dataclass
class EAPPGDConfig(EAPConfig):
    """EAP with a continuous (PGD) search of the adversarial embedding."""

    pgd_lr: float = field(default=1e-5, metadata={"help": "PGD step: emb += lr * g/|g| * |emb| (reference: 1e-5)."})
    project: bool = field(default=False, metadata={"help": "Project the embedding back into the candidates' ball (our addition; off = reference)."})

    def validate(self) -> None:
        """PGD is its own search: the preserved-concept ablation belongs to eap."""
        super().validate()
        if self.preserve_choice != "adversarial":
            raise ErasekitError("preserve_choice applies to eap; eap-pgd always preserves its PGD embedding (use --method eap --preserve-choice ...)")
        from erasekit.checks import MAX_LR, check_between

        check_between("pgd_lr", self.pgd_lr, 0.0, MAX_LR, low_open=True, why="the PGD step relative to |emb|; the reference uses 1e-5")


def exclusions(targets: list[str], pipe: Pipeline) -> set[str]:
    """The targets, their toy-world synonyms and every other target: never candidates to preserve."""
    out = {t.lower() for t in targets}
    if model_id(pipe) == "toy":
        from erasekit.world.vocab import load_vocab

        vocab = load_vocab()
        for t in targets:
            for obj in vocab.objects:
                if t.lower() in [s.lower() for s in vocab.object_synonyms(obj)]:
                    out |= {s.lower() for s in vocab.object_synonyms(obj)}
    return out


def _space(pipe: Pipeline, name: str) -> list[str]:
    if name == "auto":
        name = "toy" if model_id(pipe) == "toy" else "clip"
    return list(concept_space(name, pipe).words)


def candidates_by_target(pipe: Pipeline, targets: list[str], config: EAPConfig) -> list[tuple[list[str], dict[str, float]]]:
    """Per target: EAP's candidates (DESIGN.md §3 step 1) and each candidate's L2 distance to the target."""
    words = _space(pipe, config.concept_space)
    exclude = exclusions(targets, pipe)
    out = []
    conds = encode_cond(pipe, targets)
    for j in range(len(conds)):
        dist = distances(pipe, conds[j], words)
        cands = select_candidates(dist, words, config.k, config.n_centres, exclude, config.kmeans_n_init)
        index = {w: i for i, w in enumerate(words)}
        out.append((cands, {w: float(dist[index[w]]) for w in cands}))
    return out


class GumbelDraw:
    """One hard Gumbel sample; its straight-through embedding follows the logits as they move."""

    def __init__(self, search: GumbelSearch, target: int, noise: torch.Tensor) -> None:
        self.search, self.target, self.noise = search, target, noise
        self.index = int(torch.argmax(search.logits[target].detach() + noise))
        self.name = search.candidates[target][self.index]

    def embedding(self) -> Cond:
        """sum_i y_i E_i with y = onehot - sg(softmax) + softmax: exactly one candidate in the forward pass."""
        logits = self.search.logits[self.target]
        soft = torch.softmax((logits + self.noise) / self.search.temperature, dim=0)
        hard = torch.zeros_like(soft)
        hard[self.index] = 1.0
        y = hard - soft.detach() + soft
        return self.search.embeddings[self.target].mix(y[None])


class GumbelSearch:
    """Candidates per target, uniform-initialised logits, and their (maximising) Adam optimiser."""

    def __init__(self, pipe: Pipeline, targets: list[str], config: EAPConfig) -> None:
        self.candidates = [cands for cands, _ in candidates_by_target(pipe, targets, config)]
        self.embeddings = [encode_cond(pipe, c) for c in self.candidates]
        self.logits = [torch.zeros(len(c), requires_grad=True) for c in self.candidates]
        self.temperature = config.gumbel_temperature
        self.optimizer = torch.optim.Adam(self.logits, lr=config.gumbel_lr)

    def draw(self, target: int, generator: torch.Generator) -> GumbelDraw:
        """A fresh Gumbel(0, 1) noise vector and its hard sample."""
        u = torch.rand(len(self.candidates[target]), generator=generator).clamp(1e-10, 1 - 1e-10)
        return GumbelDraw(self, target, -torch.log(-torch.log(u)))

    def ascend(self, target: int) -> None:
        """One Adam step that *increases* the preservation loss (the gradient's sign is flipped).

        Every target with a gradient moves (a batch may draw several targets); later calls in the same step are no-ops.
        """
        grads = [logits.grad for logits in self.logits if logits.grad is not None]
        for grad in grads:
            grad.neg_()
        if grads:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def leader(self, target: int) -> str:
        """The candidate with the highest logit."""
        return self.candidates[target][int(torch.argmax(self.logits[target]))]

    def probabilities(self, target: int) -> dict[str, float]:
        """softmax(logits) per candidate."""
        p = torch.softmax(self.logits[target].detach(), dim=0)
        return {w: round(float(v), 6) for w, v in zip(self.candidates[target], p)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Logits and optimiser state, for checkpoints."""
        from erasekit.methods.checkpoint import optimizer_tensors

        tensors, groups = optimizer_tensors(self.optimizer, "opt")
        tensors.update({f"logits.{j}": logits.detach() for j, logits in enumerate(self.logits)})
        return tensors, {"opt_groups": groups, "candidates": self.candidates}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state` (the candidates must be the same)."""
        from erasekit.methods.checkpoint import load_optimizer_tensors

        if meta.get("candidates") != self.candidates:
            raise ErasekitError("the checkpoint's candidate concepts differ from this run's; resume with the same model and settings")
        with torch.no_grad():
            for j, logits in enumerate(self.logits):
                logits.copy_(tensors[f"logits.{j}"])
        load_optimizer_tensors(self.optimizer, tensors, "opt", meta["opt_groups"])

    def summary(self) -> dict[str, Any]:
        """Candidates and their final probabilities per target."""
        return {"probabilities": [self.probabilities(j) for j in range(len(self.candidates))]}


class FixedDraw:
    """A candidate chosen without search (random or nearest): a constant embedding."""

    def __init__(self, name: str, emb: Cond) -> None:
        self.name, self.emb = name, emb

    def embedding(self) -> Cond:
        """The candidate's conditioning (one row); nothing to differentiate."""
        return self.emb


class FixedChoice:
    """The paper's ablation of the preserved concept: ``random`` (uniform over EAP's candidates, every step) or ``nearest`` (fixed).

    Same candidates as :class:`GumbelSearch`, no logits and no search step.
    """

    def __init__(self, pipe: Pipeline, targets: list[str], config: EAPConfig) -> None:
        self.choice = config.preserve_choice
        self.candidates, self.nearest = [], []
        for cands, dist in candidates_by_target(pipe, targets, config):
            self.candidates.append(cands)
            self.nearest.append(min(range(len(cands)), key=lambda i: dist[cands[i]]))
        self.embeddings = [encode_cond(pipe, c) for c in self.candidates]

    def draw(self, target: int, generator: torch.Generator) -> FixedDraw:
        """The nearest candidate, or a uniform draw from the candidates."""
        n = len(self.candidates[target])
        i = self.nearest[target] if self.choice == "nearest" else int(torch.randint(n, (1,), generator=generator))
        return FixedDraw(self.candidates[target][i], self.embeddings[target][i])

    def ascend(self, target: int) -> None:
        """No search: nothing to step."""

    def leader(self, target: int) -> str:
        """The fixed candidate (nearest) or the choice's name (random)."""
        return self.candidates[target][self.nearest[target]] if self.choice == "nearest" else "<random>"

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Nothing trains; the candidates are kept to check a resume."""
        return {}, {"candidates": self.candidates}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Refuse a checkpoint made with other candidates."""
        if meta.get("candidates") != self.candidates:
            raise ErasekitError("the checkpoint's candidate concepts differ from this run's; resume with the same model and settings")

    def summary(self) -> dict[str, Any]:
        """The choice and its candidates."""
        return {"preserve_choice": self.choice, "candidates": self.candidates,
                "nearest": [c[i] for c, i in zip(self.candidates, self.nearest)]}


class PGDDraw:
    """The persistent continuous embedding (requires grad)."""

    def __init__(self, search: PGDSearch, target: int) -> None:
        self.search, self.target, self.name = search, target, "<pgd>"

    def embedding(self) -> Cond:
        """The current adversarial conditioning."""
        return self.search.embs[self.target]


class PGDSearch:
    """EAP-PGD: c_a starts at c_e's encoder output; emb += lr * g/|g| * |emb| (no projection by default)."""

    def __init__(self, pipe: Pipeline, targets: list[str], config: EAPPGDConfig) -> None:
        conds = encode_cond(pipe, targets)
        self.embs = [conds[j].map(lambda v: v.clone().requires_grad_(True)) for j in range(len(conds))]
        self.lr = config.pgd_lr
        self.radius: list[float] | None = None
        if config.project:
            words = _space(pipe, config.concept_space)
            exclude = exclusions(targets, pipe)
            self.radius = []
            for emb in self.embs:
                d = distances(pipe, emb.detach(), words)
                keep = [i for i, w in enumerate(words) if w.lower() not in exclude]
                self.radius.append(float(torch.sort(d[keep]).values[: config.k].max()))
        self.origin = [e.map(lambda v: v.detach().clone()) for e in self.embs]

    def draw(self, target: int, generator: torch.Generator) -> PGDDraw:
        """The persistent embedding (nothing random)."""
        return PGDDraw(self, target)

    @torch.no_grad()
    def ascend(self, target: int) -> None:
        """Normalised gradient ascent on the preservation loss, optionally projected."""
        parts, origin = self.embs[target].parts, self.origin[target].parts
        if any(v.grad is None for v in parts.values()):
            return
        grads = {k: v.grad for k, v in parts.items() if v.grad is not None}
        g_norm, e_norm = _norm(list(grads.values())), _norm(list(parts.values()))
        for k, v in parts.items():
            v += self.lr * grads[k] / (g_norm + 1e-12) * e_norm
        if self.radius is not None:
            n = _norm([v - origin[k] for k, v in parts.items()])
            if n > self.radius[target]:
                for k, v in parts.items():
                    v.copy_(origin[k] + (v - origin[k]) * (self.radius[target] / n))
        for v in parts.values():
            v.grad = None

    def leader(self, target: int) -> str:
        """PGD has no discrete leader; report the distance moved."""
        return f"<pgd |d|={self._moved(target):.3g}>"

    def _moved(self, target: int) -> float:
        origin = self.origin[target].parts
        return float(_norm([v.detach() - origin[k] for k, v in self.embs[target].parts.items()]))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The current embeddings, for checkpoints."""
        return {f"emb.{j}.{k}": v.detach() for j, e in enumerate(self.embs) for k, v in e.parts.items()}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        with torch.no_grad():
            for j, emb in enumerate(self.embs):
                for k, v in emb.parts.items():
                    v.copy_(tensors[f"emb.{j}.{k}"])

    def summary(self) -> dict[str, Any]:
        """How far each embedding moved."""
        return {"moved": [self._moved(j) for j in range(len(self.embs))]}


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of several tensors taken as one vector."""
    return torch.stack([(t.float() ** 2).sum() for t in tensors]).sum().sqrt() if len(tensors) > 1 else tensors[0].norm()


def fit_eap(pipe: Pipeline, request: ErasureRequest, config: EAPConfig, progress: Progress | None) -> ErasureResult:
    """Run EAP's fast path (one weight copy, batched forwards, shared rollouts); ``preserve_choice`` picks the ablation."""
    targets = [t.strip() for t in request.targets]
    choice = config.preserve_choice
    search = GumbelSearch(pipe, targets, config) if choice == "adversarial" else None if choice == "none" else FixedChoice(pipe, targets, config)
    return finetune(pipe, request, config, progress, "eap", "x0", search, config.rollout_reuse, config.faithful, rollout_share=config.rollout_share)


def fit_eap_pgd(pipe: Pipeline, request: ErasureRequest, config: EAPPGDConfig, progress: Progress | None) -> ErasureResult:
    """Run EAP with the PGD search."""
    search = PGDSearch(pipe, [t.strip() for t in request.targets], config)
    return finetune(pipe, request, config, progress, "eap-pgd", "x0", search, config.rollout_reuse, config.faithful, rollout_share=config.rollout_share)
