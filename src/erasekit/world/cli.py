"""`erasekit world …`: preview the toy world's data, rebuild its model and judge, and check its quality bars."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from erasekit.errors import ErasekitError
from erasekit.grid import label_tiles
from erasekit.world.vocab import load_vocab

if TYPE_CHECKING:  # torch-heavy modules load only when a command needs them, so `--help` stays fast
    from erasekit.world.janus_model import JanusTrainConfig
    from erasekit.world.train import WorldTrainConfig

PAD = 2  # pixels between the preview's images
WORLD_FAMILIES = ("sd", "janus")  # the toy world's models: the Stable Diffusion one, and the autoregressive toy Janus


def _world_family(family: str) -> str:
    """``--family`` of `world train`/`world check`, or a one-line error naming the choices."""
    name = family.strip().lower()
    if name not in WORLD_FAMILIES:
        raise ErasekitError(f"unknown --family {family!r}; the toy world has: {', '.join(WORLD_FAMILIES)}")
    return name

app = typer.Typer(
    help="The toy world: a procedural image world and a small real Stable Diffusion model trained on it.",
    no_args_is_help=True,
)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn an ErasekitError into `error: <message>` on one stderr line and exit code 2."""
    try:
        yield
    except ErasekitError as exc:
        from erasekit.errors import cli_message

        typer.echo(f"error: {cli_message(exc)}", err=True)  # a setting is named by its flag here
        raise typer.Exit(2) from None
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a bug to see in full
            raise
        typer.echo(f"error: cannot use {exc.filename}: {exc.strerror or exc}; choose another path", err=True)
        raise typer.Exit(2) from None


def _names(text: Optional[str], known: list[str]) -> list[str]:
    """A comma-separated list of names, or every known name when the option is not given."""
    if text is None:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ErasekitError("an empty list was given; name at least one, separated by commas")
    return names


def _write_png_atomically(image: np.ndarray, out: Path) -> None:
    """Write a PNG via a temporary file in the same folder, so a crash never leaves half a file."""
    from erasekit.atomic import save_png

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ErasekitError(f"cannot write {out}: {exc.strerror or exc}") from None
    save_png(Image.fromarray(image), out)


@app.command()
def render(
    out: Path = typer.Option(..., "--out", help="PNG file to write the preview grid to."),
    objects: Optional[str] = typer.Option(None, help="Comma-separated object classes, one row each (default: all)."),
    colours: Optional[str] = typer.Option(None, help="Comma-separated colours (default: all)."),
    styles: Optional[str] = typer.Option(None, help="Comma-separated styles (default: all)."),
    implicit: bool = typer.Option(False, "--implicit/--no-implicit", help="Draw the implicit concept (the skull) in every image."),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    scale: int = typer.Option(4, min=1, max=16, help="Integer upscaling of the grid (nearest neighbour)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    bare: bool = typer.Option(False, "--bare", help="Write the one image the choices name, unlabelled (an image prompt for `generate --image-prompt`)."),
) -> None:
    """Render a preview grid of the data: one row per object, one column per colour x style, rows and columns labelled."""
    from erasekit.world.render import Scene, render_grid  # scipy: only for this command, so `erasekit --help` stays fast

    with user_errors():
        vocab = load_vocab()
        object_names = _names(objects, vocab.objects)
        colour_names = _names(colours, vocab.colours)
        style_names = _names(styles, vocab.styles)
        for name in object_names:
            vocab.check_object(name)
        for name in colour_names:
            vocab.check_colour(name)
        for name in style_names:
            vocab.check_style(name)
        if out.suffix.lower() != ".png":
            raise ErasekitError(f"--out must name a .png file, got {out}")
        if out.exists() and not overwrite:
            raise ErasekitError(f"{out} exists; pass --overwrite to replace it or choose another --out")
        from erasekit.checks import check_seed

        check_seed("seed", seed)  # image i uses seed + i: numpy's generators take no negative seed
        combos = [(o, c, s) for o in object_names for s in style_names for c in colour_names]
        scenes = [Scene(obj, colour, style, implicit, seed + i) for i, (obj, colour, style) in enumerate(combos)]
        if bare:
            if len(scenes) != 1:
                raise ErasekitError(f"--bare writes one image and the choices name {len(scenes)}; pick one each of --objects, --colours and --styles")
            from erasekit.world.render import render as draw

            _write_png_atomically(np.kron(draw(scenes[0], vocab), np.ones((scale, scale, 1), dtype=np.uint8)), out)
            typer.echo(f"wrote {out} (1 image)")
            return
        grid = render_grid(scenes, columns=len(colour_names) * len(style_names), vocab=vocab, pad=PAD)
        grid = np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8))
        pitch = (vocab.raw["image_size"] + PAD) * scale
        grid = label_tiles(grid, object_names, colour_names * len(style_names), (pitch, pitch), PAD * scale, groups=style_names)
        _write_png_atomically(grid, out)
    typer.echo(f"wrote {out} ({len(object_names)} x {len(colour_names) * len(style_names)} images)")


def _stage_flags(config_class: type, ctx: typer.Context, show_settings: bool, steps_key: str, steps: Optional[int], threads: int) -> Optional[dict]:
    """A trainer command's stage flags (extra args, --steps into ``steps_key``, --threads); None after --show-settings printed them."""
    import dataclasses

    from erasekit.runs import parse_method_flags

    if show_settings:
        for f in dataclasses.fields(config_class):
            typer.echo(f"--{f.name.replace('_', '-'):18s} {f.default!r:8} {f.metadata.get('help', '')}")
        return None
    flags = parse_method_flags(config_class, list(ctx.args))
    if steps is not None:
        flags[steps_key] = steps
    flags["threads"] = threads
    return flags


def _resume_config(out: Path, flags: dict) -> WorldTrainConfig:
    """A new run's config from the flags, or the config of the run ``out`` holds with the flags applied."""
    from erasekit.world.train import WorldTrainConfig, load_saved_config

    saved = load_saved_config(out)
    config = saved[0] if saved else WorldTrainConfig()
    for key, value in flags.items():
        setattr(config, key, value)
    bad = [f"--{k.replace('_', '-')}" for k, v in asdict(config).items() if isinstance(v, (int, float)) and v < 0]
    if bad:
        raise ErasekitError(f"{bad[0]} must be >= 0")
    from erasekit.checks import check_between, check_fields

    check_fields(config)  # floats finite
    for key, value in asdict(config).items():  # sizes a machine can hold; the seed feeds torch's 64-bit generator after scaling
        if isinstance(value, int) and not isinstance(value, bool):
            check_between(key, value, 0, {"seed": 2**32 - 1, "threads": 1024}.get(key, 10**9))
    check_between("clip_logit_scale", config.clip_logit_scale, 0.0, 100.0, why="CLIP caps its logit scale at 100")
    for key in ("cfg_dropout", "ema_decay", "pair_word_p", "clip_swap_p"):
        check_between(key, getattr(config, key), 0.0, 1.0, why="a decay rate" if key == "ema_decay" else "a probability")
    return config


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder for the run (resumed if it holds one)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="UNet training steps (default 3500; more resumes a run to train longer)."),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)."),
    show_settings: bool = typer.Option(False, "--show-settings", help="Print every stage setting (each is a flag) and exit."),
    family: str = typer.Option("sd", "--family", help="sd: the toy Stable Diffusion model; janus: the toy Janus (as `world janus`)."),
    device: str = typer.Option("cpu", "--device", help="Torch device of the stages (cpu, cuda, cuda:1); draws stay on the CPU, floats follow the device."),
) -> None:
    """Rebuild the toy world: data, VAE, toy CLIP, judge, UNet on the frozen CLIP text tower (resumable after a kill)."""

    from erasekit.world.train import STAGES, WorldTrainConfig, WorldTrainer

    with user_errors():
        from erasekit.checks import check_device

        device = check_device(device)
        if _world_family(family) == "janus":
            if device != "cpu":
                raise ErasekitError(f"--device {device}: the toy Janus trains on the CPU only; drop --device")
            janus(ctx, out, steps, threads, show_settings)
            return
        flags = _stage_flags(WorldTrainConfig, ctx, show_settings, "unet_steps", steps, threads)
        if flags is None:
            return
        config = _resume_config(out, flags)
        from erasekit.models import quiet_loading
        from erasekit.run_display import progress_bar

        bar = progress_bar(Console(stderr=True), "loss")  # plain lines in a log file
        tasks = {stage: bar.add_task(stage, total=None, loss="") for stage in STAGES}

        def report(stage: str, step: int, total: int, info: dict) -> None:
            loss = f"loss {info['loss']:.4f}" if "loss" in info else ""
            bar.update(tasks[stage], completed=step, total=total, loss=loss)

        trainer = WorldTrainer(out, config, report, device)  # may refuse the folder: before the bar draws anything
        for stage in STAGES:
            if trainer.done(stage):
                bar.update(tasks[stage], completed=1, total=1, loss="done earlier")
        with bar, quiet_loading():  # the stages' bars only, none of HF's "Loading weights"
            result = trainer.run()
            for task in bar.tasks:
                if task.total is None:  # stages that report no steps (export)
                    bar.update(task.id, completed=1, total=1)
    typer.echo(f"wrote {out / 'pipeline'}, {out / 'clip'} and {out / 'judge'}")
    typer.echo(json.dumps({"config": asdict(config), **result}))


@app.command()
def adapter(
    out: Path = typer.Option(..., "--out", help="Folder for the run (resumed if it holds one); the adapter is written to OUT/ip_adapter."),
    steps: int = typer.Option(2000, "--steps", min=1, max=1_000_000, help="Training steps of batch 32."),
    images: int = typer.Option(8000, "--images", min=64, max=1_000_000, help="Rendered training images."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**31 - 1, help="Seed of the data, the initialisation and the steps."),
) -> None:
    """Train the toy model's image-prompt adapter (an IP-Adapter; the toy UNet and CLIP stay frozen; resumable after a kill)."""
    from erasekit.world.adapter import AdapterConfig, AdapterTrainer

    with user_errors():
        from erasekit.models import quiet_loading
        from erasekit.run_display import progress_bar

        trainer = AdapterTrainer(out, AdapterConfig(seed=seed, n_images=images, steps=steps))  # may refuse the folder first
        bar = progress_bar(Console(stderr=True), "loss")
        task = bar.add_task("adapter", total=steps, loss="")
        trainer.progress = lambda step, total, info: bar.update(task, completed=step, loss=f"loss {info['loss']:.4f}")
        with bar, quiet_loading():
            record = trainer.run()
    typer.echo(f"wrote {out / 'ip_adapter'}")
    typer.echo(json.dumps(record))


def _janus_config(out: Path, flags: dict) -> JanusTrainConfig:
    """A new toy-Janus run's config from the flags, or the config of the run ``out`` holds with the flags applied."""
    from erasekit.checks import check_between, check_fields
    from erasekit.world.janus_model import JanusTrainConfig
    from erasekit.world.janus_train import _saved

    saved = _saved(out)
    config = JanusTrainConfig(**saved[0]) if saved else JanusTrainConfig()
    for key, value in flags.items():
        setattr(config, key, value)
    check_fields(config)  # floats finite, ints whole
    for key, value in asdict(config).items():
        if isinstance(value, int) and not isinstance(value, bool):
            check_between(key, value, 0, {"seed": 2**32 - 1, "threads": 1024, "n_images": 10**7}.get(key, 10**6))
    check_between("vq_lr", config.vq_lr, 0.0, 1.0, low_open=True)
    check_between("lm_lr", config.lm_lr, 0.0, 1.0, low_open=True)
    check_between("commitment", config.commitment, 0.0, 100.0)
    check_between("cfg_dropout", config.cfg_dropout, 0.0, 1.0, why="a probability")
    return config


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def janus(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder for the run (resumed if it holds one); the model is written to OUT/janus."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=10**6, help="Language-model training steps (default 6000)."),
    threads: int = typer.Option(0, min=0, max=1024, help="torch threads (0: torch's default)."),
    show_settings: bool = typer.Option(False, "--show-settings", help="Print every stage setting (each is a flag) and exit."),
) -> None:
    """Build the toy Janus (an autoregressive JanusForConditionalGeneration) from the toy world: VQ tokenizer, then language model (resumable)."""

    from erasekit.world.janus_model import STAGES, JanusTrainConfig

    with user_errors():
        flags = _stage_flags(JanusTrainConfig, ctx, show_settings, "lm_steps", steps, threads)
        if flags is None:
            return
        config = _janus_config(out, flags)
        from erasekit.models import quiet_loading
        from erasekit.run_display import progress_bar
        from erasekit.world.janus_train import JanusTrainer

        bar = progress_bar(Console(stderr=True), "loss")
        tasks = {stage: bar.add_task(stage, total=None, loss="") for stage in STAGES}

        def report(stage: str, step: int, total: int, info: dict) -> None:
            bar.update(tasks[stage], completed=step, total=total, loss=f"loss {info['loss']:.4f}" if "loss" in info else "")

        trainer = JanusTrainer(out, config, report)  # may refuse the folder: before the bar draws anything
        for stage in STAGES:
            if trainer.done(stage):
                bar.update(tasks[stage], completed=1, total=1, loss="done earlier")
        with bar, quiet_loading():
            record = trainer.run()
            for task in bar.tasks:
                if task.total is None:
                    bar.update(task.id, completed=1, total=1)
    typer.echo(f"wrote {out / 'janus'}")
    typer.echo(json.dumps(record))


@app.command("check-janus")
def check_janus(
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object instead of a table."),
    janus_dir: Optional[Path] = typer.Option(None, "--janus", help="Toy Janus folder (default: the shipped one, assets/toy/janus)."),
    judge: Optional[Path] = typer.Option(None, help="Judge folder (default: the shipped judge)."),
    images_per_prompt: int = typer.Option(2, min=1, max=1000, help="Generated images per object x colour prompt."),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance scale on the image-token logits (Janus: 5)."),
) -> None:
    """Measure the toy Janus's quality bars: the judge's object/colour/style top-1 on its own generations, and speed."""
    from erasekit.world.janus_check import janus_check

    with user_errors():
        result = janus_check(janus_dir, judge, images_per_prompt, guidance)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title="toy Janus check")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("bar", justify="right")
    for key in ("object_top1", "colour_top1", "style_top1"):
        bar = result["bars"].get(key)
        table.add_row(f"{key.split('_')[0]} top-1 on generations", f"{result[key]:.1%}", f">= {bar:.0%}" if bar else "")
    table.add_row("seconds per 64 images", f"{result['seconds_per_64_images']:.2f}", "")
    Console().print(table)


def _print_table(result: dict, console: Console) -> None:
    """Show the check's measurements next to the quality bars of DESIGN.md §2."""
    table = Table(title="toy world check")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("bar", justify="right")
    for head, value in result["judge_accuracy"].items():
        table.add_row(f"judge accuracy ({head}, held-out renders)", f"{value:.1%}", ">= 98%")
    table.add_row("object top-1 on generations", f"{result['object_top1']:.1%}", ">= 90%")
    table.add_row("colour top-1 on generations", f"{result['colour_top1']:.1%}", ">= 90%")
    table.add_row("style top-1 on generations", f"{result['style_top1']:.1%}", ">= 80%")
    table.add_row("implicit concept, indirect prompts", f"{result['implicit_rate_indirect']:.1%}", ">= 50%")
    table.add_row("implicit concept, neutral prompts", f"{result['implicit_rate_neutral']:.1%}", "<= 5%")
    table.add_row("seconds per 64 images", f"{result['seconds_per_64_images']:.2f}", "<= 10")
    if "lookalike_pairs" in result:
        pairs = result["lookalike_pairs"]
        for row in pairs["pairs"]:
            table.add_row(f"erase {row['erased']}: {row['partner']}'s rank among drops (its drop)",
                          f"{row['partner_rank']} ({row['partner_drop']:+.1f})", "<= 3 (>= +5.0)")
        table.add_row("look-alike pairs met", f"{pairs['met']} of {pairs['of']}", f">= {pairs['of'] - 1}")
    console.print(table)


@app.command()
def check(
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object instead of a table."),
    images_per_class: int = typer.Option(20, min=1, help="Generated images per object class."),
    steps: int = typer.Option(25, min=1, help="DDIM steps per image."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default 7.5; the toy Janus: 5, on its logits)."),
    pipeline: Optional[Path] = typer.Option(None, help="Pipeline folder (default: the shipped toy model)."),
    judge: Optional[Path] = typer.Option(None, help="Judge folder (default: the shipped judge)."),
    pairs: bool = typer.Option(True, "--pairs/--no-pairs", help="Also run the look-alike-pair bar (4 ESD-x erasures, minutes)."),
    pair_images: int = typer.Option(16, min=1, help="Images per object class for the look-alike-pair bar."),
    family: str = typer.Option("sd", "--family", help="sd: the toy Stable Diffusion model; janus: the toy Janus (as `world check-janus`; --pipeline names its folder)."),
) -> None:
    """Measure the quality bars of the toy model: judge accuracy, top-1 on generations, implicit rates, speed."""
    from erasekit.run_display import progress_bar
    from erasekit.world.check import check_world

    with user_errors():
        if _world_family(family) == "janus":
            check_janus(as_json, pipeline, judge, 2, 5.0 if guidance is None else guidance)
            return
        # on stderr (stdout keeps the table or the one JSON object): a bar on a terminal, one plain line per stage in a log
        bar = progress_bar(Console(stderr=True), "info", transient=True)
        stages: dict[str, TaskID] = {}

        def report(stage: str, step: int, total: int, info: dict) -> None:
            for task in stages.values():  # a new stage starts: the earlier ones are done (a log prints each once, with its time)
                bar.update(task, completed=1)
            if step < total:
                stages[stage] = bar.add_task(stage, total=1, info=f"stage {step + 1} of {total}")

        with bar:
            result = check_world(pipeline, judge, images_per_class, steps, 7.5 if guidance is None else guidance, report, pairs=pairs, pair_images=pair_images)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_table(result, Console())
