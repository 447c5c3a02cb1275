"""The `erasekit` command line: erase, generate, methods, world (typer + rich)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

# HF libraries print notices at import time (e.g. about torchvision); keep the CLI's output to erasekit's own
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import typer  # noqa: E402
import typer.core  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress

from erasekit import __version__
from erasekit.attack.cli import attack  # noqa: E402
from erasekit.bench import app as bench_app  # noqa: E402
from erasekit.compare import compare  # noqa: E402
from erasekit.demo import DEMO_SEED
from erasekit.errors import ErasekitError
from erasekit.eval.cli import SETTINGS_FLAGS, evaluate, report, spectrum  # noqa: E402
from erasekit.itd_cli import itd_app
from erasekit.run_display import Estimate, plan_line, planned_steps, progress_bar
from erasekit.runs import parse_method_flags, partial_dir, read_request, read_toml_config, write_request, write_run  # noqa: F401
from erasekit.world.cli import app as world_app
from erasekit.world.cli import user_errors


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a bad flag, a value of the wrong type) as one `error:` line and exit code 2, like ours."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run the CLI; click's own errors become one line naming the command's --help."""
        # typer vendors click; its exception classes live in typer.core._click
        click_errors = typer.core._click.exceptions

        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(0)
        except click_errors.ClickException as exc:
            ctx = getattr(exc, "ctx", None)  # usage errors carry the click context; other ClickExceptions do not
            where = ctx.command_path if ctx is not None else "erasekit"
            typer.echo(f"error: {' '.join(exc.format_message().split())} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if isinstance(code, int) and code:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=OneLineErrors, help="Erase concepts from text-to-image diffusion models, and measure what it costs.",
    no_args_is_help=True, pretty_exceptions_enable=False,
)
app.add_typer(world_app, name="world")
app.add_typer(bench_app, name="bench")
app.add_typer(itd_app, name="itd")
app.command(context_settings=SETTINGS_FLAGS)(evaluate)
app.command()(report)
app.command()(spectrum)
app.command()(compare)
app.command(context_settings=SETTINGS_FLAGS)(attack)
console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log file


def _version(value: bool) -> None:
    if value:
        typer.echo(f"erasekit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """erasekit: erase a concept without breaking its neighbours (EAP and baselines)."""


@app.command()
def methods() -> None:
    """List the registered erasure methods: their kind, the model families each runs on, and a summary."""
    from erasekit.methods import registry
    from erasekit.methods.specs import FAMILIES  # the families' names without importing them (and torch)

    names, found = list(FAMILIES), registry()
    w_name, w_kind = max(len("method"), *map(len, found)), max(len("kind"), *(len(s.kind) for s in found.values()))
    typer.echo(f"{'method':{w_name}s} {'kind':{w_kind}s} {' '.join(f'{n:5s}' for n in names)} summary")
    for name, spec in sorted(found.items()):
        marks = " ".join(f"{'yes' if n in spec.families else '-':5s}" for n in names)
        typer.echo(f"{name:{w_name}s} {spec.kind:{w_kind}s} {marks} {spec.summary}")


def _progress_bar() -> Progress:
    return progress_bar(console, "info")  # a bar on a terminal; plain lines in a log file


def _describe(record: dict[str, Any]) -> str:
    losses = {k.removesuffix("_loss"): v for k, v in record.items() if k.endswith("_loss") and isinstance(v, (int, float))}
    text = " ".join(f"{name} {value:.4g}" for name, value in losses.items())  # a method's own losses (erase/preserve, denoise, ...)
    if record.get("most_sensitive"):
        text += f" most sensitive: {record['most_sensitive']}"
    return text


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def erase(
    ctx: typer.Context,
    concept: list[str] = typer.Option([], "--concept", "-c", help="Concept to erase (repeat for several)."),
    model: str = typer.Option("toy", "--model", "-m", help="'toy', 'toy-janus', a diffusers or Janus folder, or a hub id."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family (sd, sdxl, sd3, flux, janus); read from the folder when not given."),
    method: str = typer.Option("eap", "--method", help="Registered method (see `erasekit methods`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder to create (delta.safetensors, history.json, run.json)."),
    preserve: list[str] = typer.Option([], "--preserve", help="Concept to keep, in addition to the adversarial one (repeatable)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Preset: paper (defaults), fast, toy (default on --model toy)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of method settings."),
    device: str = typer.Option("cpu", "--device", help="Torch device of a single process (cpu, cuda, cuda:1); under accelerate launch, cuda = each process's own GPU."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Model steps between checkpoints in OUT.partial/ (0: only on Ctrl-C)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run whose --out was this folder."),
    show_settings: bool = typer.Option(False, "--show-settings", help="Print the settings this run would use (budget, model, flags, --config) and exit."),
    allow_unknown: bool = typer.Option(False, "--allow-unknown", help="Accept a concept that looks like a mistake: a word outside the toy world's vocabulary (--model toy), or a comma inside one."),
) -> None:
    """Erase concept(s) from a model; method settings are flags too (e.g. --iterations 200 --k 40)."""
    with user_errors():
        from erasekit.methods import get_method, make_config  # torch loads only once the method's name is known
        from erasekit.runs import check_resume_matches, settings_lines

        if resume is not None:
            request = read_request(resume)
            spec = get_method(request["method"])
            options = {"concept": [c.strip() for c in concept], "preserve": [p.strip() for p in preserve], "model": model, "method": method,
                       "family": family, "device": device, "checkpoint_every": checkpoint_every, "allow_unknown": allow_unknown}
            given = {k: v for k, v in options.items() if _typed(ctx, k)}
            if out is not None and out != resume:
                raise ErasekitError(f"--out {out} differs from --resume {resume}; --resume continues the run in place: drop --out")
            settings = read_toml_config(config, spec.name, spec.config_class) if config else {}
            settings.update(parse_method_flags(spec.config_class, list(ctx.args)))
            check_resume_matches(request, given, settings, make_config(spec, budget, **settings) if budget else None)
            out, model, method, device = resume, request["model"], request["method"], request.get("device", device)
            family, allow_unknown = request.get("family"), request.get("allow_unknown", False)
            concept, preserve = request["concepts"], request["preserve"]
            from erasekit.run_folders import resumed_config

            cfg = resumed_config(spec, request, resume)
            checkpoint_every = int(request["checkpoint_every"])
        else:
            spec = get_method(method)
            concept, preserve = [c.strip() for c in concept], [p.strip() for p in preserve]
            settings = read_toml_config(config, method, spec.config_class) if config else {}
            settings.update(parse_method_flags(spec.config_class, list(ctx.args)))
            from erasekit.api import check_model_family
            from erasekit.models import TOY_MODELS

            if budget is None and model in TOY_MODELS:
                budget = "toy"
            if show_settings:  # a method's settings are shown whatever the model (`erase --method ear --show-settings`)
                for line in settings_lines(spec, make_config(spec, budget, **settings), budget, model):
                    typer.echo(line)
                return
            check_model_family(spec, model)  # ear on an SD model, esd-x on a Janus one: refused before anything loads
            if not concept or any(not c for c in concept):
                raise ErasekitError("empty concept (or none given); pass --concept WORD such as 'circle'")
            if any(not p for p in preserve):
                raise ErasekitError("empty --preserve; give a word or phrase such as 'ring', or drop the flag")
            from erasekit.concepts import check_length, check_targets

            check_targets(concept, preserve, toy=model in TOY_MODELS, allow_unknown=allow_unknown, cli=True)
            if out is None:
                raise ErasekitError("missing --out; name the run folder to create")
            if checkpoint_every < 0:
                raise ErasekitError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
            cfg = make_config(spec, budget, **settings)
            if (check := getattr(cfg, "check_concepts", None)) is not None:
                check(concept)
            if out.exists():
                raise ErasekitError(f"{out} already exists; choose a new --out folder or remove it")
            from erasekit.run_folders import clear_stale_partial

            clear_stale_partial(out, note=console.print)  # refuses a resumable or live one; removes one that never checkpointed
            from erasekit.models import load_tokenizer

            if (tokenizer := load_tokenizer(model)) is not None:  # the 77-token check, before the model loads
                for text, what in [*((c, "concept") for c in concept), *((p, "preserve concept") for p in preserve)]:
                    check_length(tokenizer, text, what)
        from erasekit.api import erase as run_erase
        from erasekit.distributed import distributed, resolve_device
        from erasekit.methods.checkpoint import CheckpointSpec
        from erasekit.models import load_pipeline

        pipe = load_pipeline(model, device=resolve_device(device), family=family, autoregressive=True)
        from erasekit.api import check_family, family_of_model

        check_family(spec.name, spec.families, *family_of_model(pipe))  # a hub id or a resumed run: known only once loaded
        if (check_model := getattr(cfg, "check_model", None)) is not None:
            check_model(pipe)  # settings that depend on the loaded model, before anything is written
        rank, _, barrier = distributed(cpu=pipe.device.type == "cpu")
        console.quiet = rank != 0  # under accelerate launch the main process reports and writes
        barrier()  # every process has checked --out before the main process creates it
        work = partial_dir(out)
        if resume is None and rank == 0:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                work.mkdir()
            except OSError as exc:
                raise ErasekitError(f"cannot create {work}: {exc.strerror or exc}; choose a writable --out") from None
            write_request(work, {"model": model, "family": family, "method": method, "concepts": concept, "preserve": list(preserve), "device": device,
                                 "config": dataclasses.asdict(cfg), "checkpoint_every": checkpoint_every, "allow_unknown": allow_unknown,
                                 "argv": sys.argv})
        total = planned_steps(cfg) or 1
        console.print(plan_line(method, cfg))
        with _progress_bar() as bar:
            task = bar.add_task(f"{method} ✕ {', '.join(concept)}", total=total, info="preparing")
            estimate = Estimate(bar.console, total)

            def report(step: int, n: int, rec: dict[str, Any]) -> None:
                bar.update(task, completed=step, info=_describe(rec))
                estimate.tick(step)

            try:
                result = run_erase(pipe, concept, method=method, config=cfg, preserve=preserve, progress=report,
                                   checkpoint=CheckpointSpec(work, checkpoint_every), release_unused=True, allow_unknown=allow_unknown)
            except BaseException as exc:  # an error, a crash or Ctrl-C: keep OUT.partial only if it holds a checkpoint
                if (work / "checkpoint.safetensors").exists():
                    if isinstance(exc, ErasekitError):
                        raise ErasekitError(f"{exc}; continue with `erasekit erase --resume {out}`") from None
                    raise
                if resume is None and rank == 0:  # nothing worth keeping: leave no trace of the failed start
                    shutil.rmtree(work, ignore_errors=True)
                raise
        if rank != 0:
            return
        if resume is None:
            write_run(out, result, model, sys.argv)
        else:  # run.json keeps the command that started the run, and names the one that finished it
            write_run(out, result, model, request.get("argv") or sys.argv, resumed_by=sys.argv)
        shutil.rmtree(work, ignore_errors=True)
        console.print(f"wrote {out / 'delta.safetensors'} ({result.timings.get('total_s', 0):.1f} s)")


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _resolve_delta(delta: Path) -> Path:
    return delta / "delta.safetensors" if delta.is_dir() else delta


@app.command()
def generate(
    ctx: typer.Context,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Text file, one prompt per line."),
    model: str = typer.Option("toy", "--model", "-m", help="'toy', 'toy-janus', a diffusers or Janus folder, or a hub id."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family (sd, sdxl, sd3, flux, janus); read from the folder when not given."),
    delta: list[Path] = typer.Option([], "--delta", help="Erasure delta (file or run folder): base and erased side by side; repeat to combine SPM adapters."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG grid to write."),
    images: int = typer.Option(4, "--images", help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", help="Base seed; image j of prompt i uses seed + 1000 i + j."),
    steps: int = typer.Option(25, "--steps", help="DDIM steps (diffusion pipelines)."),
    guidance: float = typer.Option(7.5, "--guidance", help="CFG scale (on a Janus model default 5, Janus-Pro's)."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    force: bool = typer.Option(False, "--force", help="Apply a delta even if its base hash differs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    image_prompt: Optional[Path] = typer.Option(None, "--image-prompt", help="An image every prompt is also given, through the model's IP-Adapter (SD 1.x/2.x)."),
    image_adapter: Optional[str] = typer.Option(None, "--image-adapter", help="IP-Adapter folder (weights + image_encoder/) for --image-prompt; the toy model ships its own."),
) -> None:
    """Generate a PNG grid (rows: prompts; with --delta, base | erased side by side; SPM adapters with transport on and off)."""
    with user_errors():
        from erasekit.grid import prompt_grid, save_png

        prompts = [p.strip() for p in prompt]
        if prompts_file is not None:
            if not prompts_file.is_file():
                raise ErasekitError(f"no prompts file at {prompts_file}")
            prompts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts or (any(not p for p in prompts) and image_prompt is None):  # with an image, '' prompts by the image alone
            raise ErasekitError("no prompt given (or an empty one); pass --prompt TEXT or --prompts-file FILE")
        if not 1 <= images <= 64:
            raise ErasekitError(f"--images must be between 1 and 64, got {images}")
        if not 1 <= steps <= 1000:
            raise ErasekitError(f"--steps must be between 1 and 1000, got {steps}")
        if not 0 <= seed < 2**63:
            raise ErasekitError(f"--seed must be a whole number in 0 .. 2**63 - 1, got {seed}")
        if not 0 <= guidance <= 50:  # NaN fails this too
            raise ErasekitError(f"--guidance must be >= 0 and <= 50 (a CFG scale; 7.5 is usual), got {guidance}")
        if out.exists() and not overwrite:
            raise ErasekitError(f"{out} already exists; pass --overwrite or choose another --out")
        if out.suffix.lower() != ".png":
            raise ErasekitError(f"--out must end in .png, got {out.name}")
        _check_writable_folder(out.parent)
        from erasekit.concepts import check_length, check_prompt
        from erasekit.models import load_pipeline, load_tokenizer, model_family
        from erasekit.panels import JANUS_GUIDANCE, check_janus_options, diffusion_panels, janus_panels
        from erasekit.result import load_result

        janus = model_family(model) == "janus"  # an autoregressive model: its own sampler, and no diffusion-only options
        if janus:
            check_janus_options(model, image_prompt, image_adapter, _typed(ctx, "steps"))
            guidance = guidance if _typed(ctx, "guidance") else JANUS_GUIDANCE

        if (tokenizer := load_tokenizer(model)) is not None:  # the 77-token check, before the model loads
            for p in filter(None, prompts):
                check_length(tokenizer, p, "prompt")
        results = [load_result(_resolve_delta(d)) for d in delta]
        spm = bool(results) and all(r.kind == "hook" and r.hook.get("type") == "spm" for r in results)
        if len(results) > 1 and not spm:
            raise ErasekitError("several --delta combine only when all are SPM adapters; pass one delta of any other method")
        from erasekit.image_prompt import checked_prompt

        picture = checked_prompt(image_prompt, model, image_adapter)
        pipe = load_pipeline(model, device=device, family=family, autoregressive=janus)
        for p in filter(None, prompts):
            check_prompt(pipe, p, "prompt")
        if picture is not None:
            from erasekit.image_prompt import attach_adapter

            attach_adapter(pipe, picture[1])
        for result in results:  # refuse a delta of another base before spending time on the base images
            result.check_fits(pipe, check_base=not force)
        all_prompts = [p for p in prompts for _ in range(images)]
        seeds = [seed + 1000 * i + j for i in range(len(prompts)) for j in range(images)]
        with _progress_bar() as bar:
            panels_n = 1 + bool(results) + spm  # SPM adapters: transport as saved, then flipped
            task = bar.add_task("generate", total=len(all_prompts) * panels_n, info="base")
            tick = lambda n: bar.advance(task, n)  # noqa: E731
            tell = lambda info: bar.update(task, info=info)  # noqa: E731
            if janus:  # image tokens drawn one by one: no sampler steps, no image prompt
                panels = janus_panels(pipe, all_prompts, seeds, guidance, results, tick, tell)
            else:
                image = picture[0] if picture is not None else None
                panels = diffusion_panels(pipe, all_prompts, seeds, results, spm, tick, tell, steps=steps, guidance=guidance, image_prompt=image)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)  # as erase does; only now, so a refused run leaves no folder
        except OSError as exc:
            raise ErasekitError(f"cannot create {out.parent}: {exc.strerror or exc}; choose a writable --out") from None
        save_png(prompt_grid(prompts, images, panels), out)
        console.print(f"wrote {out}")


def _check_writable_folder(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work: its nearest existing parent decides."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ErasekitError(f"cannot create {folder}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ErasekitError(f"cannot write in {existing}: permission denied; choose a writable --out")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder to create (run files, grid.png, report.html)."),
    concept: str = typer.Option("circle", "--concept", "-c", help="Toy object class to erase."),
    seed: int = typer.Option(DEMO_SEED, "--seed", help="EAP's training seed (the README's table shows how erasure varies with it)."),
) -> None:
    """Erase a toy concept with EAP and write a before/after grid and a report (a few minutes on 2 cores)."""
    with user_errors():
        from erasekit.demo import check_demo, run_demo

        check_demo(out, concept, seed)  # before the bar and the folder: a refusal is one line and leaves nothing
        if not out.parent.exists():
            out.parent.mkdir(parents=True)
        with _progress_bar() as bar:
            task = bar.add_task(f"eap ✕ {concept}", total=None, info="preparing")
            images = bar.add_task("evaluation images", total=None, info="", visible=False)

            def on_image(name: str, done: int, total: int) -> None:
                bar.update(images, visible=True, completed=done, total=total, info=name)

            def announce(seconds: float) -> None:
                console.print(f"expected time on this machine: about {max(1, round(seconds / 60))} min "
                              f"(erase with EAP's toy preset, then judge base and erased images); progress below")

            record = run_demo(out, concept, progress=lambda step, n, rec: bar.update(task, total=n, completed=step, info=_describe(rec)),
                              eval_progress=on_image, announce=announce, seed=seed)
        from erasekit.eval.cli import metrics_table

        Console().print(metrics_table(record))
        typer.echo(f"wrote {out}/report.html, {out}/grid.png and the run files (delta.safetensors, history.json, run.json)")


def main() -> None:
    """Console-script entry point."""
    app()
