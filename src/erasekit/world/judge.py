"""The toy world's judge: a small CNN with heads for object, colour, style and the implicit concept.

It plays ResNet-50 (ESR/PSR), NudeNet (the implicit-concept detector) and Inception (FID features).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from erasekit.errors import ErasekitError

FEATURE_DIM = 128


class Judge(nn.Module):
    """CNN over 32x32 RGB images in [-1, 1]; returns logits per head."""

    def __init__(self, n_objects: int, n_colours: int, n_styles: int) -> None:
        super().__init__()
        self.counts = {"object": n_objects, "colour": n_colours, "style": n_styles, "implicit": 1}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, n) for name, n in self.counts.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used for the toy FID)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits for every head; ``implicit`` is a single logit per image."""
        feats = self.body(images)
        return {name: head(feats) for name, head in self.heads.items()}

    def save(self, folder: Path) -> None:
        """Write weights (safetensors) and the head sizes (json)."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "judge.safetensors"))
        (folder / "judge.json").write_text(json.dumps({k: v for k, v in self.counts.items() if k != "implicit"}))

    @classmethod
    def load(cls, folder: Path) -> Judge:
        """Load a judge saved by :meth:`save`, in eval mode."""
        try:
            counts = json.loads((folder / "judge.json").read_text())
            judge = cls(counts["object"], counts["colour"], counts["style"])
            judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ErasekitError(f"cannot load the judge from {folder}: {exc}; rebuild it with `erasekit world train`") from exc
        return judge.eval()


def to_judge_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images (or float NCHW in [0, 1]) -> float NCHW in [-1, 1]."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = images.float()
    return x * 2.0 - 1.0


@torch.inference_mode()
def judge_images(judge: Judge, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run the judge on uint8 NHWC images: per-head probabilities (softmax; sigmoid for implicit)."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in judge.counts}
    outs["features"] = []
    for start in range(0, len(images), batch_size):
        x = to_judge_input(images[start : start + batch_size])
        feats = judge.body(x)
        outs["features"].append(feats.numpy())
        for name, head in judge.heads.items():
            logits = head(feats)
            probs = torch.sigmoid(logits[:, 0]) if name == "implicit" else torch.softmax(logits, dim=1)
            outs[name].append(probs.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}
