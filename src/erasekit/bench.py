"""Benchmarks of EAP's fast path against the reference-shaped faithful path (and ESD-x), measured side by side.

Every measured configuration runs in its own subprocess, so its wall time and peak RSS are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import typer

from erasekit.errors import ErasekitError

MAX_BENCH_SEEDS = 20  # each seed is two trainings and two evaluations; 20 paired seeds give tight intervals
SD14_NOTE = "SD-1.4 UNet and text encoder with random weights; latent reduced to 16x16 (CPU), DDIM rollout of 10 steps"


def sd14_pipeline(latent: int = 16) -> Any:
    """A diffusers StableDiffusionPipeline with SD 1.4's UNet and text-encoder architecture (random weights)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.world.toy import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe: Any = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.register_to_config(_name_or_path="sd14-architecture-random")
    return pipe


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (in this process) and return its timings; called by the subprocess."""
    import torch

    from erasekit.api import erase
    from erasekit.models import toy_pipeline

    torch.manual_seed(0)
    if spec["model"] == "sd14":
        pipe = sd14_pipeline()
        words = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        words.write("\n".join(["ring", "moon", "square", "star", "dog", "cat", "tree", "car", "bird", "fish", "house", "river"]))
        words.close()
        spec["settings"]["concept_space"] = words.name
    else:
        pipe = toy_pipeline()
    started = time.perf_counter()
    steps: list[float] = []
    result = erase(pipe, spec["concept"], method=spec["method"], budget=spec.get("budget"), release_unused=spec.get("release_unused", True),
                   progress=lambda s, n, r: steps.append(time.perf_counter()), **spec["settings"])
    wall = time.perf_counter() - started
    if spec.get("delta"):
        result.save(spec["delta"], overwrite=True)
    per_step = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) if len(steps) > 1 else wall
    return {"wall_s": wall, "setup_s": result.timings.get("setup_s", 0.0), "seconds_per_step": per_step, "steps": len(steps),
            "peak_rss_mib": own_peak_rss_mib()}


def own_peak_rss_mib() -> float | None:
    """This process's own peak RSS (Linux VmHWM), in MiB; None where /proc is unavailable.

    ``ru_maxrss`` is not used: on Linux exec keeps the parent's high-water mark, so a child started
    by a large parent would report at least the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh subprocess; return its result plus its peak RSS (MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, "-m", "erasekit.bench", json.dumps(spec), str(out)])
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0 or not out.exists():
            raise ErasekitError(f"the benchmark worker for {spec['method']} on {spec['model']} failed (exit status {status}); its error is printed above")
        result = json.loads(out.read_text())
    if result.get("peak_rss_mib") is None:
        result["peak_rss_mib"] = usage.ru_maxrss / 1024.0
    return result


def eap_speed(images_per_class: int = 20, concept: str = "circle", sd14: bool = True, log: Any = print,
              iterations: int | None = None, sd14_steps: int = 3, seeds: int = 1) -> dict[str, Any]:
    """Issue 7's side-by-side: fast vs faithful EAP (and ESD-x) on the toy world, plus SD-1.4-architecture steps.

    Every run uses the toy preset's step budget (or ``iterations`` for all of them), in its own subprocess.
    With ``seeds`` > 1 fast and faithful are trained with seeds 0..seeds-1: ESR-1/PSR-1 are the means over
    seeds (one seed's erasure varies by several points), times are summed and memory is the largest.
    """
    import platform
    import statistics

    check_bench(images_per_class, iterations, sd14_steps if sd14 else None, seeds)
    from erasekit.eval.runner import evaluate

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict[str, Any]]] = {"fast": [], "faithful": [], "esd-x": []}
        plan: list[tuple[str, str, dict[str, Any], int]] = [(name, method, settings, seed) for seed in range(seeds)
                for name, method, settings in (("fast", "eap", {}), ("faithful", "eap", {"faithful": True}))]
        plan.append(("esd-x", "esd-x", {}, 0))
        for name, method, settings, seed in plan:
            settings = {**settings, "seed": seed, **({"iterations": iterations} if iterations is not None else {})}
            delta = str(Path(tmp) / f"{name}-{seed}.safetensors")
            run = measure({"model": "toy", "method": method, "concept": concept, "budget": "toy", "settings": settings, "delta": delta})
            log(f"toy {name:9s} seed {seed}: {run['wall_s']:.1f} s wall, {run['seconds_per_step']:.3f} s/step, peak RSS {run['peak_rss_mib']:.0f} MiB")
            if name != "esd-x":
                metrics = evaluate(delta, "toy-objects", model="toy", images_per_class=images_per_class, cache_dir=Path(tmp) / "cache")
                head = metrics["metrics"]["erased"]["headline"]
                from erasekit.compare_seeds import rate_counts

                run.update(esr1=head["ESR-1"], psr1=head["PSR-1"], counts=rate_counts(metrics))
                log(f"toy {name:9s} seed {seed}: ESR-1 {head['ESR-1']:.1f} %, PSR-1 {head['PSR-1']:.1f} % ({images_per_class} images per class)")
            runs[name].append(run)

        def total(name: str, key: str) -> float:
            return sum(r[key] for r in runs[name])

        def mean(name: str, key: str) -> float:
            return statistics.fmean(r[key] for r in runs[name])

        out.update(
            time_ratio_fast_vs_faithful=total("fast", "wall_s") / total("faithful", "wall_s"),
            memory_ratio_fast_vs_faithful=max(r["peak_rss_mib"] for r in runs["fast"]) / max(r["peak_rss_mib"] for r in runs["faithful"]),
            time_ratio_fast_vs_esd=runs["fast"][0]["wall_s"] / runs["esd-x"][0]["wall_s"],
            esr1_fast=mean("fast", "esr1"), esr1_faithful=mean("faithful", "esr1"),
            psr1_fast=mean("fast", "psr1"), psr1_faithful=mean("faithful", "psr1"),
        )
        if seeds > 1:
            from erasekit.compare_seeds import images_behind
            from erasekit.eval.intervals import paired_difference, rate_interval, verdict

            for key in ("esr1", "psr1"):
                for name in ("fast", "faithful"):
                    values = [r[key] for r in runs[name]]
                    span = rate_interval(values, images_behind(f"{key[:3].upper()}-1", runs[name][0]["counts"]))
                    out[f"{key}_{name}_per_seed"] = [round(v, 2) for v in values]
                    out[f"{key}_{name}_interval"] = [round(span.lo, 2), round(span.hi, 2)]
                diff = paired_difference([r[key] for r in runs["fast"]], [r[key] for r in runs["faithful"]])
                out[f"{key}_fast_minus_faithful"] = [round(diff.mean, 2), round(diff.lo, 2), round(diff.hi, 2)]
                out[f"{key}_fast_vs_faithful"] = verdict(diff)
                log(f"{key.upper()[:3]}-1 fast - faithful over {seeds} paired seeds: {diff.mean:+.1f} [{diff.lo:+.1f}, {diff.hi:+.1f}] -> {verdict(diff)}")
    if sd14:
        sd: dict[str, dict[str, Any]] = {}
        for name, extra in (("fast", {}), ("faithful", {"faithful": True})):
            settings = {"iterations": sd14_steps, "ddim_steps": 10, "k": 8, "n_centres": 3, "rollout_reuse": 1, **extra}
            sd[name] = measure({"model": "sd14", "method": "eap", "concept": "a cat", "settings": settings})
            log(f"sd-1.4 arch {name:9s}: {sd[name]['seconds_per_step']:.1f} s/step, peak RSS {sd[name]['peak_rss_mib']:.0f} MiB ({SD14_NOTE}; "
                "both paths free the text encoder and VAE once the embeddings exist, as `erasekit erase` does)")
        out.update(
            sd14_step_ratio_fast_vs_faithful=sd["fast"]["seconds_per_step"] / sd["faithful"]["seconds_per_step"],
            sd14_memory_ratio_fast_vs_faithful=sd["fast"]["peak_rss_mib"] / sd["faithful"]["peak_rss_mib"],
        )
    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    return out


def check_bench(images_per_class: int, iterations: int | None, sd14_steps: int | None, seeds: int) -> None:
    """Refuse sizes outside their ranges (one line naming the flag), before any worker starts; None skips a check."""
    from erasekit.checks import MAX_ITERATIONS, check_between
    from erasekit.eval.suites import SEED_STRIDE

    check_between("images_per_class", images_per_class, 1, SEED_STRIDE, why="the seeds of one class must not run into the next's")
    if iterations is not None:
        check_between("iterations", iterations, 1, MAX_ITERATIONS)
    if sd14_steps is not None:
        check_between("sd14_steps", sd14_steps, 2, MAX_ITERATIONS, why="the first step includes warm-up, so timing needs two")
    check_between("seeds", seeds, 1, MAX_BENCH_SEEDS, why="each seed trains fast and faithful EAP and evaluates both")


app = typer.Typer(help="Benchmarks, measured on this machine (each configuration in its own process).", no_args_is_help=True)


@app.command("eap")
def bench_eap(
    images_per_class: int = typer.Option(20, "--images-per-class", help="Toy-objects images per class for ESR-1/PSR-1."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Model steps of every toy run (default: the toy preset's)."),
    sd14: bool = typer.Option(True, "--sd14/--no-sd14", help="Also time training steps on an SD-1.4-architecture UNet and text encoder."),
    sd14_steps: int = typer.Option(3, "--sd14-steps", help="Model steps timed per SD-1.4-architecture run."),
    seeds: int = typer.Option(1, "--seeds", help="Train fast and faithful with this many seeds; ESR-1/PSR-1 are their means, with 95 % intervals and the paired difference from 2 seeds on."),
) -> None:
    """EAP fast vs faithful (and ESD-x): wall time, peak RSS, ESR-1/PSR-1; the last line is one JSON object."""
    from erasekit.world.cli import user_errors

    with user_errors():
        check_bench(images_per_class, iterations, sd14_steps if sd14 else None, seeds)
        result = eap_speed(images_per_class=images_per_class, sd14=sd14, log=typer.echo, iterations=iterations, sd14_steps=sd14_steps, seeds=seeds)
        typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    res = worker(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(res))
