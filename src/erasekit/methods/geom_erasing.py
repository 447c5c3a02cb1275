"""Geom-Erasing (Liu, Chen et al., "Implicit Concept Removal of Diffusion Models", ECCV 2024).

An *implicit* concept (a watermark, nudity from innocent prompts; the toy world's skull mark) is drawn although no
prompt names it, so the model cannot be asked to unlearn it by name. Geom-Erasing first *locates* it: a detector
finds it and its box in the training images, and each such image's caption gets words for where it is ("… with a
skull at the top right", on a grid of places). The denoiser is fine-tuned on the images with these captions (the
ordinary denoising loss), so the concept binds to its location words instead of hiding in the rest of the caption;
at inference the location phrases are the negative prompt, which removes the concept without naming it in the prompt.

Data: ``toy`` renders toy-world scenes, half of them with the skull under indirect captions (the renderer's ground
truth gives its box), or a folder of images, each with a same-stem ``.txt`` caption, located by a detector command
(``command:CMD``: run as ``CMD IMAGE``, it prints a JSON list of boxes ``[x0, y0, x1, y1]`` in pixels; ``[]`` when
the concept is absent). The result is a weights delta that carries a ``negative-prompt`` hook
(:mod:`erasekit.methods.negative_prompt`): ``generate --delta``, ``evaluate``, ``compare`` apply both.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.concepts import check_prompt, encode_cond
from erasekit.errors import ErasekitError, SettingError
from erasekit.families import Cond, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, TrainableModel
from erasekit.methods.fewshot_te import image_latents
from erasekit.methods.negative_prompt import prompt_tensors
from erasekit.methods.trainer import Setup, train
from erasekit.models import weights_hash
from erasekit.result import HOOK_PREFIX, ErasureResult

Box = tuple[float, float, float, float]
PLACES = {
    2: (("top left", "top right"), ("bottom left", "bottom right")),
    3: (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right")),
}


@dataclass
class GeomErasingConfig(MethodConfig):
    """Geom-Erasing settings (Liu, Chen et al., ECCV 2024); the training sizes are the usual SD fine-tuning ones."""

    data: str = field(default="toy", metadata={"help": "toy (toy-world renders, the renderer's skull boxes) or a folder of images with same-stem .txt captions."})
    detector: str = field(default="", metadata={"help": "For a folder: command:CMD, run as CMD IMAGE, printing a JSON list of boxes [x0, y0, x1, y1] in pixels."})
    n_images: int = field(default=400, metadata={"help": "Toy renders to fine-tune on (data toy)."})
    implicit_share: float = field(default=0.5, metadata={"help": "Share of the toy renders that carry the concept, under indirect captions (data toy)."})
    grid: int = field(default=3, metadata={"help": "Places per side of the location grid (2: corners; 3: top left ... bottom right; more: 'row r column c')."})
    min_cover: float = field(default=0.25, metadata={"help": "A cell is named when it holds at least this share of the box (the centre's cell always is)."})
    negative: str = field(default="seen", metadata={"help": "Negative prompt: seen (the places found in the data, most frequent first) or all (every cell)."})
    iterations: int = field(default=1000, metadata={"help": "Optimiser steps."})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the denoiser (1e-5, the usual SD fine-tuning rate)."})
    batch_size: int = field(default=4, metadata={"help": "Images per step."})
    train_method: str = field(default="full", metadata={"help": "Parameters to train: full (the paper fine-tunes the denoiser), xattn, noxattn, selfattn, lora."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank when train_method is lora."})
    precision: str = field(default="fp32", metadata={"help": "fp32 only for now."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_ITERATIONS, MAX_LORA_RANK, MAX_LR, check_between
        from erasekit.models import TRAIN_METHODS

        check_between("n_images", self.n_images, 2, 100_000)
        check_between("implicit_share", self.implicit_share, 0.0, 1.0, low_open=True, why="some images must carry the concept")
        check_between("grid", self.grid, 1, 8, why="places per side; 3 names top left ... bottom right")
        check_between("min_cover", self.min_cover, 0.0, 1.0, why="a share of the box")
        check_between("iterations", self.iterations, 1, MAX_ITERATIONS)
        check_between("batch_size", self.batch_size, 1, 1024)
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="Adam's step; 1e-5 is usual for SD")
        check_between("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)
        if self.negative not in ("seen", "all"):
            raise SettingError("negative", f"unknown {{name}} {self.negative!r}; choose seen or all")
        if self.train_method not in TRAIN_METHODS:
            raise SettingError("train_method", f"unknown {{name}} {self.train_method!r}; choose one of: {', '.join(TRAIN_METHODS)}")
        if self.precision != "fp32":
            raise SettingError("precision", f"{{name}} {self.precision!r} is not supported by geom-erasing; use fp32")
        if self.data != "toy" and not Path(self.data).is_dir():
            raise SettingError("data", f"{{name}} {self.data!r} is neither toy nor a folder; pass a folder of images with same-stem .txt captions")
        if self.data != "toy" and not self.detector.startswith("command:"):
            raise SettingError("detector", "{name} must be command:CMD (printing a JSON list of boxes per image) when data is a folder")


def place_name(row: int, col: int, grid: int) -> str:
    """The words for cell (row, col) of a ``grid`` x ``grid`` layout ('top right'; 'row 2 column 4' beyond 3 x 3)."""
    if grid == 1:
        return "centre"
    if grid in PLACES:
        return PLACES[grid][row][col]
    return f"row {row + 1} column {col + 1}"


def places(box: Box, width: int, height: int, grid: int, min_cover: float) -> tuple[str, ...]:
    """The cells that hold at least ``min_cover`` of the box's area (always the cell of its centre), in reading order."""
    x0, y0, x1, y1 = (max(0.0, min(float(v), float(lim))) for v, lim in zip(box, (width, height, width, height)))
    if x1 <= x0 or y1 <= y0:
        raise ErasekitError(f"the box {list(box)} is empty inside the {width} x {height} image; the detector must give [x0, y0, x1, y1] with x0 < x1, y0 < y1")
    area = (x1 - x0) * (y1 - y0)
    cw, ch = width / grid, height / grid
    centre = (min(int((y0 + y1) / 2 // ch), grid - 1), min(int((x0 + x1) / 2 // cw), grid - 1))
    found = []
    for r in range(grid):
        for c in range(grid):
            ox = max(0.0, min(x1, (c + 1) * cw) - max(x0, c * cw))
            oy = max(0.0, min(y1, (r + 1) * ch) - max(y0, r * ch))
            if (r, c) == centre or ox * oy >= min_cover * area:
                found.append(place_name(r, c, grid))
    return tuple(found)


def location_phrase(concept: str, where: tuple[str, ...]) -> str:
    """'with a skull at the top right' (several cells: 'at the top and the top right')."""
    article = "an" if concept[:1].lower() in "aeiou" else "a"
    return f"with {article} {concept} at the " + " and the ".join(where)


def negative_prompt(concept: str, seen: list[tuple[str, ...]], grid: int, mode: str) -> str:
    """The negative prompt: the concept at each place set found in the data (most frequent first), or at every cell."""
    sets: list[tuple[str, ...]]
    if mode == "all":
        sets = [(place_name(r, c, grid),) for r in range(grid) for c in range(grid)]
    else:
        sets = [s for s, _ in Counter(seen).most_common()]
    if not sets:
        raise ErasekitError(f"the detector found no {concept} in any image; Geom-Erasing needs images that carry it (check the detector or the data)")
    return ", ".join(location_phrase(concept, s).removeprefix("with ") for s in sets)


def toy_data(concept: str, config: GeomErasingConfig) -> tuple[np.ndarray, list[str], list[list[Box]]]:
    """Toy-world renders: ``implicit_share`` of them carry the skull under indirect captions (boxes: the renderer's truth)."""
    from erasekit.world.captions import INDIRECT, PLAIN, caption
    from erasekit.world.render import Scene, render, skull_box
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    if concept.strip().lower() != vocab.implicit_name:
        raise ErasekitError(f"the toy data carries one implicit concept, {vocab.implicit_name!r}, not {concept!r}; erase {vocab.implicit_name!r} or pass --data FOLDER")
    size = int(vocab.raw["image_size"])
    rng = np.random.default_rng([config.seed, 20_24])
    n_implicit = max(1, round(config.n_images * config.implicit_share))
    images, captions, boxes = [], [], []
    for i in range(config.n_images):
        implicit = i < n_implicit
        pick = lambda names: names[int(rng.integers(len(names)))]  # noqa: E731
        scene = Scene(pick(vocab.objects), pick(vocab.colours), pick(vocab.styles), implicit, seed=config.seed * 1_000_003 + i)
        images.append(render(scene, vocab))
        captions.append(caption(scene, INDIRECT if implicit else PLAIN, rng, vocab))
        boxes.append([skull_box(size)] if implicit else [])
    return np.stack(images), captions, boxes


def detect(command: str, image: Path) -> list[Box]:
    """Run the detector command on one image; its boxes (a one-line error naming the image when it fails)."""
    argv = [*shlex.split(command.removeprefix("command:")), str(image)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ErasekitError(f"the detector command could not run on {image.name} ({exc.__class__.__name__}: {exc}); check --detector command:CMD") from None
    if done.returncode != 0:
        raise ErasekitError(f"the detector command failed on {image.name} (exit {done.returncode}: {done.stderr.strip()[-200:] or 'no message'})")
    try:
        raw = json.loads(done.stdout)
        return [(float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in raw]
    except (ValueError, TypeError, IndexError):
        raise ErasekitError(f"the detector printed {done.stdout.strip()[:80]!r} for {image.name}; it must print a JSON list of boxes [x0, y0, x1, y1]") from None


def folder_data(pipe: Pipeline, config: GeomErasingConfig) -> tuple[torch.Tensor, list[str], list[list[Box]], tuple[int, int]]:
    """A folder's images (as latents), their captions (same-stem .txt) and the detector's boxes."""
    from PIL import Image

    from erasekit.methods.fewshot_te import IMAGE_SUFFIXES, folder_latents

    files = sorted(p for p in Path(config.data).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SettingError("data", f"{{name}} {config.data} holds no image ({', '.join(IMAGE_SUFFIXES)}); add the training images and their captions")
    captions, boxes = [], []
    for f in files:
        text = f.with_suffix(".txt")
        if not text.is_file():
            raise SettingError("data", f"{{name}}: {f.name} has no caption file {text.name}; put each image's caption beside it")
        captions.append(text.read_text(encoding="utf-8").strip())
        boxes.append(detect(config.detector, f))
    with Image.open(files[0]) as first:
        size = first.size
    return folder_latents(pipe, files), captions, boxes, size


def geom_loop(s: Setup[GeomErasingConfig], progress: Progress | None, latents: torch.Tensor, conds: Cond) -> None:
    """Fine-tune on (image, location-augmented caption) pairs with the ordinary denoising loss."""
    for step in range(s.done, s.config.iterations):
        s.between_steps = False
        idx = torch.randint(len(latents), (s.config.batch_size,), generator=s.generator)
        x_t, t, target = s.schedule.noised(latents[idx], s.generator)
        loss = F.mse_loss(s.trainable.eps(x_t, t, conds[idx]).float(), target.float())
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        s.end_step(step + 1, {"step": step + 1, "denoise_loss": round(loss.item(), 6)}, loss.detach(), loss.new_zeros(()), None, progress)


def fit_geom_erasing(pipe: Pipeline, request: ErasureRequest, config: GeomErasingConfig, progress: Progress | None) -> ErasureResult:
    """Locate the implicit concept, fine-tune on captions that name its place, and carry the places as the negative prompt."""
    started = time.perf_counter()
    if len(request.targets) != 1:
        raise ErasekitError("geom-erasing removes one implicit concept per run; erase each concept in its own run")
    if request.preserve:
        raise ErasekitError("geom-erasing keeps the other concepts through the images without the concept in its data; drop --preserve")
    concept = check_prompt(pipe, request.targets[0], "concept")
    if config.data == "toy":
        images, captions, boxes = toy_data(concept, config)
        latents, (width, height) = image_latents(pipe, images), (images.shape[2], images.shape[1])
    else:
        latents, captions, boxes, (width, height) = folder_data(pipe, config)
    where = [tuple(dict.fromkeys(p for b in bs for p in places(b, width, height, config.grid, config.min_cover))) for bs in boxes]  # () without it
    seen = [w for w in where if w]
    negative = negative_prompt(concept, seen, config.grid, config.negative)
    texts = [f"{c} {location_phrase(concept, w)}" if w else c for c, w in zip(captions, where)]
    for text in sorted(set(texts)):
        check_prompt(pipe, text, "caption")
    hook_tensors = prompt_tensors(pipe.tokenizer, negative)  # refuses a negative prompt longer than the encoder reads
    family = family_of(pipe)
    conds = encode_cond(pipe, texts)
    base_hash = request.base_hash or weights_hash(pipe)
    trainable = TrainableModel(pipe, config.train_method, config.lora_rank)
    s: Setup[GeomErasingConfig] = Setup(
        pipe=pipe, config=config, targets=[concept], preserve=[], emb_null=family.uncond(pipe), emb_targets=encode_cond(pipe, [concept]),
        emb_preserve=None, family=family, schedule=family.schedule(pipe, 50), trainable=trainable,
        optimizer=torch.optim.Adam(list(trainable.params.values()), lr=config.lr), generator=torch.Generator().manual_seed(config.seed),
        base_hash=base_hash, started=started,
    )
    s.history.append({"images": len(texts), "with_concept": len(seen), "places": dict(Counter(" and ".join(w) for w in seen)), "negative_prompt": negative})
    result = train(s, request, "geom-erasing", lambda s, p: geom_loop(s, p, latents.to(s.trainable.device), conds), None, 1, progress)
    hook = {"type": "negative-prompt", "encoder": "text_encoder", "layer": 0, "settings": {"prompt": negative}}
    return dataclasses.replace(result, delta={**result.delta, **{HOOK_PREFIX + k: v for k, v in hook_tensors.items()}}, hook=hook)

