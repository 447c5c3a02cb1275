"""The toy CLIP: a small ViT and the toy text encoder, trained contrastively on renders and captions.

As in Stable Diffusion, the text encoder the UNet is conditioned on comes from a CLIP that was trained
first, on image-text pairs, and is frozen while the UNet learns. So two words land near each other
because their *images* look alike (a disc and a circle, a ring and a moon), not because the UNet needed
it. The image tower stays with the world as its CLIP-score and CLIP-feature instrument.

Shipped as two halves: the text tower is the pipeline's ``text_encoder`` (it is the same weights), and
``clip/`` holds the image tower, both projections and the temperature; :func:`load_clip` joins them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

from erasekit.errors import ErasekitError
from erasekit.world import toy
from erasekit.world.vocab import WorldVocab, load_vocab

PROJECTION = 128
WEIGHTS = "clip.safetensors"


def build_clip(seed: int = 0) -> CLIPModel:
    """A CLIPModel: the toy text encoder's architecture and a 4-layer, 128-wide ViT over 8x8 patches of 32x32 images.

    8-pixel patches, not 4: the image tower costs 5x less per step (0.34 s against 1.6 s for a batch of
    256 on one core), which is what makes the stage fit in minutes on 2 cores.
    """
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=128, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, projection_dim=PROJECTION, hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=toy.text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=PROJECTION
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def fix_temperature(model: CLIPModel, logit_scale: float) -> None:
    """Hold the InfoNCE logit scale at ``logit_scale`` instead of learning it (a lever for the look-alike geometry).

    A learned scale climbs, and at a low temperature InfoNCE spends its gradient on the hardest negatives,
    the look-alikes. Measured for v2 (600-step probes): a fixed scale of 10 did *not* bring them nearer
    (square-diamond cosine -0.32 against -0.25 learned); captions that name a pair by a shared vague word
    did (``pair_word_p``), so the default learns the scale, as CLIP does.
    """
    model.logit_scale.data.fill_(math.log(logit_scale))
    model.logit_scale.requires_grad_(False)


def pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> the image tower's input: float NCHW in [-1, 1] (the judge's convention)."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def token_ids(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the longest text (causal attention: what precedes the first EOS ignores padding)."""
    return torch.tensor(tokenizer(list(texts), padding="longest", max_length=77, truncation=True).input_ids)


def contrastive_loss(model: CLIPModel, x: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, every pair whose image has the same labels counted as a positive.

    ``labels`` (N,) encodes (object, colour, style, implicit): two captions drawn for the same labels
    describe the same picture, so treating one as the other's negative would only add noise.
    """
    image = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    return multi_positive_infonce(model.logit_scale.exp().clamp(max=100.0) * text @ image.T, labels)


def multi_positive_infonce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of text-image logits against targets spread evenly over same-label pairs."""
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def label_key(obj: np.ndarray, colour: np.ndarray, style: np.ndarray, implicit: np.ndarray) -> np.ndarray:
    """One integer per image naming its (object, colour, style, implicit) labels."""
    return ((obj * 100 + colour) * 100 + style) * 2 + implicit


@torch.inference_mode()
def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm projected text embeddings."""
    return F.normalize(model.get_text_features(input_ids=token_ids(tokenizer, texts)).pooler_output, dim=-1)


@torch.inference_mode()
def image_embeddings(model: CLIPModel, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """Unit-norm projected image embeddings of uint8 NHWC images (of the toy CLIP's own size: one line otherwise)."""
    vision: Any = model.config.vision_config
    side = int(vision.image_size)
    if images.ndim == 4 and tuple(images.shape[1:3]) != (side, side):
        raise ErasekitError(f"the world's toy CLIP reads {side}x{side} images but the model drew {images.shape[1]}x{images.shape[2]}; "
                            "judge it with the judge/ of a world at its resolution (--judge DIR)")
    out = [
        model.get_image_features(pixel_values=pixels(images[s : s + batch_size])).pooler_output
        for s in range(0, len(images), batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


def class_prompts(head: str, vocab: WorldVocab) -> list[list[str]]:
    """Per class of ``head``, the prompts whose mean embedding is that class's zero-shot classifier."""
    objs, cols = vocab.objects, vocab.colours
    if head == "object":
        return [[f"a {c} {o}" for c in cols] + [f"an image of a {o}"] for o in objs]
    if head == "colour":
        return [[f"a {c} {o}" for o in objs] for c in cols]
    adjectives = {s: [a for a in vocab.raw["styles"][s]["adjectives"] if a][0] for s in vocab.styles}
    return [[f"a {adjectives[s]} {c} {o}" for o in objs for c in cols] for s in vocab.styles]


def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, held: dict[str, np.ndarray]) -> dict[str, float]:
    """Zero-shot top-1 on held-out renders for object, colour and style (prompt ensembles per class)."""
    vocab = load_vocab()
    images = image_embeddings(model, held["images"])
    out = {}
    for head in ("object", "colour", "style"):
        classes = torch.stack([text_embeddings(model, tokenizer, p).mean(0) for p in class_prompts(head, vocab)])
        pred = (images @ F.normalize(classes, dim=-1).T).argmax(1).numpy()
        out[head] = float(np.mean(pred == held[head]))
    return out


def object_similarity(model: CLIPModel, tokenizer: CLIPTokenizer) -> dict[str, object]:
    """Cosine similarity of the objects' evaluation prompts, and designed look-alikes against unrelated pairs."""
    vocab = load_vocab()
    objs = vocab.objects
    emb = text_embeddings(model, tokenizer, [f"an image of a {o}" for o in objs])
    sim = (emb @ emb.T).numpy()
    near = [sim[i, j] for i, a in enumerate(objs) for j, b in enumerate(objs) if b in vocab.neighbours(a)]
    far = [sim[i, j] for i, a in enumerate(objs) for j, b in enumerate(objs)
           if i != j and b not in vocab.neighbours(a) and a not in vocab.neighbours(b)]
    return {
        "objects": objs,
        "matrix": np.round(sim, 3).tolist(),
        "lookalike_mean": float(np.mean(near)),
        "unrelated_mean": float(np.mean(far)),
    }


def text_encoder_of(model: CLIPModel) -> CLIPTextModel:
    """The text tower as the CLIPTextModel a StableDiffusionPipeline takes (same weights)."""
    config = model.config.text_config
    assert isinstance(config, CLIPTextConfig), type(config)  # CLIPConfig turns a dict text_config into a CLIPTextConfig
    text = CLIPTextModel(config)
    text.load_state_dict(model.text_model.state_dict())
    return text.eval()


def save_clip(model: CLIPModel, folder: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write everything but the text tower (which the pipeline's text_encoder holds) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if not k.startswith("text_model.")}
    save_file(state, str(folder / WEIGHTS))
    (folder / "config.json").write_text(model.config.to_json_string())


def load_clip(folder: Path, text_encoder: CLIPTextModel) -> CLIPModel:
    """Join a folder written by :func:`save_clip` and the pipeline's text encoder into one fp32 CLIPModel."""
    try:
        config = CLIPConfig(**json.loads((folder / "config.json").read_text()))
        model = CLIPModel(config)
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.text_model.load_state_dict(text_encoder.state_dict())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ErasekitError(f"cannot load the toy CLIP from {folder}: {str(exc).splitlines()[0]}; rebuild it with `erasekit world train`") from None
    stray = [k for k in missing if not k.startswith("text_model.")] + list(unexpected)
    if stray:
        raise ErasekitError(f"the toy CLIP in {folder} does not match its config ({stray[0]}); rebuild it with `erasekit world train`")
    return model.eval()


def find_world_clip(judge_dir: Path) -> tuple[Path, Path] | None:
    """(clip/, pipeline/text_encoder/) of the toy world a judge folder belongs to, or None for a world without a CLIP."""
    world = judge_dir.parent
    clip_dir, text_dir = world / "clip", world / "pipeline" / "text_encoder"
    return (clip_dir, text_dir) if (clip_dir / WEIGHTS).is_file() and text_dir.is_dir() else None


def load_world_clip(judge_dir: Path) -> CLIPModel | None:
    """The toy CLIP of the world a judge folder belongs to (the *base* text tower, never an erased one), or None."""
    from erasekit.models import quiet_loading

    found = find_world_clip(judge_dir)
    if found is None:
        return None
    with quiet_loading():
        return load_clip(found[0], CLIPTextModel.from_pretrained(found[1], dtype=torch.float32))


def clip_outputs(model: CLIPModel, images: np.ndarray, prompts: Sequence[str], batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per image: the toy-CLIP score against its own prompt (100 * max(cos, 0)) and its image embedding (FID features)."""
    from erasekit.eval.metrics import clip_score

    tokenizer = toy.build_tokenizer()
    image = image_embeddings(model, images, batch_size).numpy()
    text = torch.cat([text_embeddings(model, tokenizer, prompts[s : s + batch_size]) for s in range(0, len(prompts), batch_size)])
    return {"clip": clip_score(image, text.numpy()), "features": image}
