"""Load pipelines, choose trainable parameters, and save/load erasure deltas (safetensors only)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasekit.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from erasekit.errors import ErasekitError
from erasekit.families.base import TRAIN_SETS, Pipeline

TRAIN_METHODS = TRAIN_SETS  # one list: the families define the sets
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_ADAPTER = "erasekit"


def toy_dir() -> Path:
    """Folder of the shipped toy world (pipeline/ and judge/)."""
    return Path(str(resources.files("erasekit.world").joinpath("assets/toy")))


def toy_pipeline(dtype: torch.dtype = torch.float32) -> Pipeline:
    """The shipped toy Pipeline, loaded offline with ``from_pretrained``."""
    folder = toy_dir() / "pipeline"
    if not (folder / "model_index.json").exists():
        raise ErasekitError("the toy model is not shipped in this install; build it with `erasekit world train --out DIR` and pass --model DIR")
    pipe = _from_pretrained(str(folder), dtype)
    pipe.register_to_config(_name_or_path="toy")
    return pipe


TOY_JANUS = "toy-janus"  # --model value of the shipped toy Janus (the autoregressive family's embedded default)
TOY_MODELS = ("toy", TOY_JANUS)  # the toy world's models: its vocabulary checks and `toy` budget presets apply


def toy_janus_dir() -> Path:
    """Folder of the shipped toy Janus (a ``JanusForConditionalGeneration`` saved with its tokenizer), when this install has it."""
    return toy_dir() / "janus"


def is_janus_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved Janus model: a ``config.json`` of ``model_type`` janus (and no diffusers ``model_index.json``)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return False
    try:
        return bool(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "janus")
    except (OSError, ValueError, AttributeError):
        return False


def model_family(model: str) -> str | None:
    """The family of a ``--model`` value read without loading it: sd for ``toy``, janus for ``toy-janus`` or a Janus folder; None otherwise."""
    if model == "toy":
        return "sd"
    if model == TOY_JANUS or (bool(model) and os.path.isdir(model) and is_janus_folder(model)):
        return "janus"
    return None


def _load_janus_model(model: str, device: str, dtype: torch.dtype, family: str | None) -> Any:
    """The Janus of ``toy-janus`` or a Janus folder (loaded with transformers' own classes)."""
    from erasekit.autoregressive.janus import load_janus

    if family is not None and family.strip().lower() != "janus":
        raise ErasekitError(f"--family {family} contradicts --model {model}, which is a Janus (autoregressive) model; drop --family")
    if model != TOY_JANUS:
        return load_janus(model, device, dtype)
    if not (toy_janus_dir() / "config.json").is_file():
        raise ErasekitError("the toy Janus is not shipped in this install; train it with `erasekit world janus --out DIR` and pass --model DIR/janus")
    janus = load_janus(toy_janus_dir(), device, dtype)
    janus.name_or_path = TOY_JANUS  # as the toy pipeline is "toy": run records and deltas name it the same on every install
    return janus


@contextmanager
def quiet_loading() -> Iterator[None]:
    """While erasekit loads a model: transformers and diffusers log errors only and draw no loading bars (restored after).

    The one switch for their notices (e.g. "CLIPImageProcessor requires torchvision") and their "Loading pipeline
    components" / "Loading weights" bars; a hub download still shows its own bar.
    """
    from transformers.utils import logging as tlog  # first: diffusers' import can already print transformers' notices

    saved = [(tlog, tlog.get_verbosity(), tlog.is_progress_bar_enabled())]
    tlog.set_verbosity_error()
    from diffusers.utils import logging as dlog

    saved.append((dlog, dlog.get_verbosity(), dlog.is_progress_bar_enabled()))
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def _from_pretrained(source: str, dtype: torch.dtype, local_only: bool = False, family: str = "sd") -> Any:
    try:
        with quiet_loading():
            from diffusers import DiffusionPipeline, StableDiffusionPipeline

            if family == "sd":
                pipe = StableDiffusionPipeline.from_pretrained(
                    source, dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=local_only
                )
            else:
                pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ErasekitError(f"cannot load a {family} pipeline from {source!r} ({first}); pass a diffusers folder, a hub id you have cached, or 'toy'") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def release_unused(pipe: Pipeline) -> int:
    """Free the text encoders' and VAE's weights of a pipeline whose denoiser alone is used from now on; returns bytes freed.

    For a caller that will not use the pipeline again (the CLI's ``erase``): the embeddings a fine-tuning run
    needs are computed before this, so only one model's weights stay in memory while it trains.
    """
    freed = 0
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module) and not is_released(module):
            freed += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
            module.to("meta")
    return freed


def is_released(module: nn.Module) -> bool:
    """True when :func:`release_unused` freed this module's weights."""
    return any(p.device.type == "meta" for p in module.parameters())


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, family: str | None = None, autoregressive: bool = False) -> Any:
    """Load a pipeline of any supported family from ``toy``, a local diffusers folder, or a cached hub id (no downloads).

    The family is read from the folder's ``model_index.json``; ``family`` (``--family``) must agree with it.
    With ``autoregressive`` a Janus model (``toy-janus`` or a folder whose ``config.json`` says janus) loads too, as an
    :class:`erasekit.autoregressive.Janus`; without it (the commands that run on diffusion pipelines only) it is refused in one line.
    """
    from erasekit.checks import check_device
    from erasekit.families import detect, get_family

    check_device(device)  # before minutes of loading
    if not model or not model.strip():
        raise ErasekitError("empty --model; pass 'toy', a diffusers folder, or a hub id")
    if model_family(model) == "janus":
        if not autoregressive:
            raise ErasekitError(f"{model} is a Janus (autoregressive) model, which this command does not support yet; "
                                "`erasekit erase --method ear`, `generate`, `evaluate`, `compare` and `attack` run on Janus")
        return _load_janus_model(model, device, dtype, family)
    if family is not None and family.strip().lower() == "janus":
        raise ErasekitError(f"--family janus contradicts --model {model}, which is not a Janus folder (no config.json of model_type janus); drop --family")
    if model == "toy":
        if family is not None and get_family(family).name != "sd":
            raise ErasekitError(f"--family {family} contradicts --model toy, which is an SD 1.x model; drop --family")
        pipe = toy_pipeline(dtype)
    elif os.path.isdir(model):
        from erasekit.world.config import check_world_folder

        model = str(check_world_folder(Path(model)))
        if not os.path.exists(os.path.join(model, "model_index.json")):
            raise ErasekitError(f"{model} is not a diffusers pipeline folder (no model_index.json); save one with pipe.save_pretrained(DIR)")
        pipe = _from_pretrained(model, dtype, local_only=True, family=detect(model, family).name)
    elif os.path.exists(model):
        raise ErasekitError(f"{model} is a file, not a diffusers pipeline folder; pass the folder that holds model_index.json")
    elif model.count("/") == 1 and not model.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(model, "model_index.json")  # the family of a cached hub id, read offline
        found = detect(Path(index).parent, family).name if isinstance(index, str) else get_family(family or "sd").name
        pipe = _from_pretrained(model, dtype, family=found)
    else:
        raise ErasekitError(f"no pipeline folder at {model!r}; pass 'toy', a diffusers folder, or a hub id like CompVis/stable-diffusion-v1-4")
    return pipe.to(device)


def load_tokenizer(model: str) -> Any | None:
    """The (first, CLIP) tokenizer of ``toy`` or a local pipeline folder, read without the model's weights.

    It lets a command check prompt lengths before the model loads; None where it cannot be read on its own
    (a hub id, a folder without ``tokenizer/``): the check then happens once the pipeline has loaded.
    """
    folder = toy_dir() / "pipeline" if model == "toy" else Path(model) if model and os.path.isdir(model) else None
    if folder is None:
        return None
    try:
        from erasekit.world.config import check_world_folder

        folder = check_world_folder(folder)
        kind = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("tokenizer", [None, None])[1]
        with quiet_loading():
            import transformers

            return getattr(transformers, str(kind)).from_pretrained(str(folder / "tokenizer"))
    except (OSError, ValueError, AttributeError, TypeError, ErasekitError):
        return None  # load_pipeline says what is wrong with the folder, in its own words


def model_id(pipe: Pipeline) -> str:
    """A human-readable identifier of the pipeline's base model."""
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "unknown")


def weights_hash(pipe: Any) -> str:
    """SHA-256 over the denoiser's and text encoders' parameter names, shapes and bytes (first 16 hex digits); a Janus: its whole model.

    SD 1.x/2.x hash (unet, text_encoder) as they always did, so older deltas keep their base check.
    """
    from erasekit.autoregressive.janus import Janus
    from erasekit.families.base import is_adapter

    if isinstance(pipe, Janus):
        from erasekit.autoregressive.delta import janus_weights_hash

        return janus_weights_hash(pipe.model)
    digest = hashlib.sha256()
    named = [(name, getattr(pipe, name, None)) for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")]
    for prefix, module in ((n, m) for n, m in named if isinstance(m, nn.Module)):
        for name, tensor in sorted(module.state_dict().items()):
            if ".lora_" in name or is_adapter(name):
                continue
            digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def select_parameters(unet: nn.Module, train_method: str) -> dict[str, nn.Parameter]:
    """The parameters of an SD 1.x/2.x UNet a train method changes (DESIGN.md §3; ``lora`` is handled by add_lora).

    The SD family's own sets (``families.unet``), kept under this name for the code and tests that predate families.
    """
    from erasekit.families import get_family

    return get_family("sd").parameters(unet, train_method)


def add_lora(unet: Any, rank: int, targets: list[str] | None = None) -> dict[str, nn.Parameter]:
    """Attach a PEFT LoRA adapter of ``rank`` to every attention projection (``targets``); return its parameters."""
    from peft import LoraConfig

    if rank < 1:
        raise ErasekitError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets or LORA_TARGETS)
    unet.add_adapter(config, adapter_name=LORA_ADAPTER)
    return {n: p for n, p in unet.named_parameters() if ".lora_" in n}


@contextmanager
def lora_disabled(unet: Any) -> Iterator[None]:
    """Run the UNet as its frozen base: the LoRA adapter switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def lora_state_dict(unet: Any, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The adapter's weights in a LoRA key format the family's ``load_lora_weights`` reads.

    UNets (SD, SDXL): diffusers' ``lora.down``/``lora.up`` keys, as erasekit always wrote them. Transformers (SD3,
    FLUX): PEFT's own ``lora_A``/``lora_B`` keys, their loaders' native format (the converted keys are not all
    mapped back by the FLUX loader).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER)
    if prefix == "unet":
        state = convert_state_dict_to_diffusers(state)
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in state.items()}


def remove_lora(unet: Any) -> None:
    """Drop the erasekit adapter and PEFT's wrapper layers: the UNet is its base module again (same state-dict keys)."""
    unet.delete_adapters(LORA_ADAPTER)
    if not getattr(unet, "peft_config", None):  # no other adapter left: unwrap the layers PEFT injected
        unet.unload_lora()


def json_dumps(obj: object) -> str:
    """Stable, readable JSON used in metadata and run files; a NaN or infinity is a one-line error, never written."""
    from erasekit.checks import strict_json

    return strict_json(obj, "the record", "a value came out undefined; check the settings and inputs", indent=1, sort_keys=True, default=str)
