"""Image prompts: an IP-Adapter on an SD 1.x/2.x pipeline, loaded and driven through diffusers' own classes.

An IP-Adapter (Ye et al. 2023) turns a CLIP image embedding into a few extra tokens (``ImageProjection``) that
every cross-attention reads through its own keys and values (``to_k_ip``/``to_v_ip``). diffusers loads one
into the UNet with ``load_ip_adapter`` (the layout of the public checkpoints: ``image_proj.*`` and
``ip_adapter.*``, an ``image_encoder`` folder beside them); the shipped toy adapter is in the same layout.

Methods see an image prompt as the :class:`~erasekit.families.Cond` part ``image``: the projected tokens
(N x tokens x width). A row of zeros is "no image": the adapter's key and value projections have no bias, so
zero tokens contribute exactly nothing and the model answers as without an adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError

WEIGHTS = "ip_adapter.safetensors"
ENCODER = "image_encoder"
PART = "image"


def toy_adapter_dir() -> Path:
    """The shipped toy IP-Adapter (weights, image encoder and its preprocessor)."""
    return Path(str(resources.files("erasekit.world").joinpath("assets/toy/ip_adapter")))


def has_adapter(pipe: Any) -> bool:
    """Whether an IP-Adapter is loaded into the pipeline's UNet."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet, "encoder_hid_proj", None) is not None and getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"


def require_adapter(pipe: Any, what: str = "an image prompt") -> None:
    """Refuse, in one line, a pipeline that has no IP-Adapter loaded."""
    if not has_adapter(pipe):
        raise ErasekitError(f"{what} needs an image adapter and this pipeline has none; pass --image-adapter FOLDER (an IP-Adapter for SD 1.x/2.x), or use --model toy, which ships one")


def adapter_source(model_name: str, adapter: str | Path | None) -> Path | None:
    """The adapter folder to load: the one given, the toy's own for the toy model, else none."""
    if adapter is not None and str(adapter) != "":
        return toy_adapter_dir() if str(adapter) == "toy" else Path(adapter)
    return toy_adapter_dir() if model_name == "toy" else None


def attach_adapter(pipe: Any, folder: str | Path) -> None:
    """Load the IP-Adapter in ``folder`` (``ip_adapter.safetensors`` or one ``*.safetensors``/``*.bin``, and ``image_encoder/``)."""
    from erasekit.families import family_of

    folder = Path(folder)
    if family_of(pipe).name != "sd":
        raise ErasekitError(f"image prompts are supported on SD 1.x/2.x pipelines; this is a {family_of(pipe).label} pipeline")
    if not folder.is_dir():
        raise ErasekitError(f"no image adapter folder at {folder}; pass a folder holding an IP-Adapter's weights and its image_encoder/")
    weights = [folder / WEIGHTS] if (folder / WEIGHTS).is_file() else sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    if len(weights) != 1:
        raise ErasekitError(f"{folder} holds {len(weights)} weight files; it needs exactly one IP-Adapter file ({WEIGHTS}, or one *.safetensors / *.bin)")
    if not (folder / ENCODER / "config.json").is_file():
        raise ErasekitError(f"{folder} has no {ENCODER}/ folder; put the adapter's CLIP image encoder (CLIPVisionModelWithProjection) there")
    if has_adapter(pipe):
        raise ErasekitError("this pipeline already has an image adapter; load the model again to use another one")
    from transformers import CLIPImageProcessor

    from erasekit.models import quiet_loading

    with quiet_loading():
        try:
            if (folder / "preprocessor_config.json").is_file():
                pipe.register_modules(feature_extractor=CLIPImageProcessor.from_pretrained(str(folder)))
            pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weights[0].name, image_encoder_folder=ENCODER, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ErasekitError(f"cannot load the image adapter in {folder} ({str(exc).splitlines()[0][:200]}); is it an IP-Adapter for this model's width?") from None
    pipe.image_encoder.to(device=pipe.unet.device, dtype=pipe.unet.dtype)


def load_images(paths: Sequence[str | Path]) -> list[Any]:
    """Open image files as RGB PIL images, with a one-line error for one that is not an image."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ErasekitError(f"no image file at {path}; pass a PNG or JPEG as the image prompt")
        try:
            with Image.open(path) as img:
                out.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ErasekitError(f"{path} is not an image ({exc.__class__.__name__}); pass a PNG or JPEG as the image prompt") from None
    return out


def checked_prompt(path: Path | None, model: str, adapter: str | None) -> tuple[Any, Path] | None:
    """(the image, the adapter folder) of ``--image-prompt``, checked before the model loads; None without one."""
    if path is None:
        if adapter:
            raise ErasekitError("--image-adapter is read only with --image-prompt; pass an image too, or drop it")
        return None
    image = load_images([path])[0]
    folder = adapter_source(model, adapter)
    if folder is None:
        raise ErasekitError(f"--image-prompt needs an image adapter and {model} has none built in; pass --image-adapter FOLDER (an IP-Adapter with its image_encoder/)")
    return image, folder


@torch.no_grad()
def image_embeds(pipe: Any, images: Sequence[Any] | np.ndarray) -> torch.Tensor:
    """The image encoder's projected embeddings (N x d) of PIL images or uint8 N x H x W x 3 arrays."""
    require_adapter(pipe)
    items = list(images) if not isinstance(images, np.ndarray) else [img for img in images]
    pixels = pipe.feature_extractor(items, return_tensors="pt").pixel_values
    enc = pipe.image_encoder
    return enc(pixels.to(device=enc.device, dtype=enc.dtype)).image_embeds


def projection(pipe_or_unet: Any) -> Any:
    """The adapter's image projection (embedding -> tokens, diffusers' ``ImageProjection``) inside the UNet."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return unet.encoder_hid_proj.image_projection_layers[0]


def image_tokens(pipe: Any, images: Sequence[Any] | np.ndarray) -> torch.Tensor:
    """The tokens (N x tokens x width) an image prompt adds to every cross-attention."""
    embeds = image_embeds(pipe, images)
    with torch.no_grad():
        return projection(pipe)(embeds.to(pipe.unet.dtype))


def text_guided(tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Co-Erasing's text-guided refinement: each image token becomes the softmax(q k^T / sqrt(d))-weighted mix of the prompt's rows.

    The image tokens are the queries, the prompt's text states both keys and values, so what is left of the image is
    what the text names (the reference computes exactly this, with no learned projection).
    """
    scores = tokens @ hidden.transpose(1, 2) / hidden.shape[-1] ** 0.5
    return torch.softmax(scores.float(), dim=-1).to(hidden.dtype) @ hidden


@contextmanager
def _bypass_projection(unet: Any) -> Iterator[None]:
    """Hand the UNet already projected tokens: its own projection is lifted off for the call."""
    proj = unet.encoder_hid_proj
    unet.encoder_hid_proj = None
    try:
        yield
    finally:
        unet.encoder_hid_proj = proj


def predict_with_image(model: Any, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The UNet's output for text states and image tokens (a row of zero tokens: exactly no image)."""
    if getattr(model, "encoder_hid_proj", None) is None:
        raise ErasekitError("an image prompt reached a UNet with no image adapter; attach one first (--image-adapter)")
    with _bypass_projection(model):
        return model(x, t, encoder_hidden_states=(hidden, [tokens[:, None]])).sample


def empty_tokens(unet: Any, batch: int, like: torch.Tensor) -> torch.Tensor:
    """No image prompt for a UNet with an adapter: ``batch`` rows of zero tokens."""
    layer = projection(unet)
    return torch.zeros(batch, int(layer.num_image_text_embeds), int(unet.config.cross_attention_dim), dtype=like.dtype, device=like.device)


def no_image(tokens: torch.Tensor) -> torch.Tensor:
    """The tokens that stand for no image prompt (zeros)."""
    return torch.zeros_like(tokens)
