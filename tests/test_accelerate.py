"""Scale out with accelerate: two CPU processes over gloo give the numbers of one process; the README's launch lines run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_pipeline
from erasekit import distributed as dist
from erasekit.errors import ErasekitError
from erasekit.models import toy_dir

README = Path(__file__).resolve().parents[1] / "README.md"
LAUNCHER = shutil.which("accelerate", path=str(Path(sys.executable).parent))
needs_launcher = pytest.mark.skipif(LAUNCHER is None, reason="accelerate's launcher is not installed")
needs_toy = pytest.mark.skipif(not (toy_dir() / "pipeline" / "model_index.json").exists(), reason="the toy model is not shipped in this checkout")
EVAL = {"images_per_class": 4, "batch_size": 4}  # what the README's evaluate line asks for


def readme_launch_lines() -> list[str]:
    """The `accelerate launch` lines of the README's bash blocks, verbatim."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("accelerate launch")]


def launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """One thread per process, no GPU, the launcher from this venv first on PATH, a private generation cache."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ERASEKIT_CACHE": str(tmp_path / "cache"), **extra}


def run_line(line: str, cwd: Path, env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    """Run a README line through bash exactly as written."""
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def line_with(words: str) -> str:
    """The README launch line that contains ``words``."""
    lines = [line for line in readme_launch_lines() if words in line]
    assert len(lines) == 1, f"expected one README launch line with {words!r}, found {lines}"
    return lines[0]


def image_bytes(cache: Path) -> dict[str, bytes]:
    """Every cached PNG by name."""
    return {p.name: p.read_bytes() for p in cache.rglob("*.png")}


@pytest.fixture(scope="module")
def one_process_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, bytes]]:
    """The README's evaluation on one process, in-process, with its own empty cache."""
    from erasekit.eval.runner import evaluate

    cache = tmp_path_factory.mktemp("one-cache")
    out = evaluate("toy", "toy-objects", erased=["circle"], cache_dir=cache, **EVAL)
    return out, image_bytes(cache)


def test_readme_shows_single_and_multi_machine_launch_lines() -> None:
    lines = readme_launch_lines()
    assert any("--num_machines" in line and "--machine_rank $MACHINE_RANK" in line and "--main_process_ip $MAIN_IP" in line for line in lines)
    assert any(" erase " in line and "--batch-size" in line for line in lines)
    assert all("--device cpu" in line and "--multi_gpu" in line for line in lines)  # the CPU form, which the tests run


@needs_launcher
@needs_toy
def test_toy_objects_evaluation_on_two_processes_matches_one_process(tmp_path: Path, one_process_eval: tuple[dict, dict[str, bytes]]) -> None:
    line = line_with("--num_processes 2 --main_process_port 0 -m erasekit evaluate")
    assert "--images-per-class 4 --batch-size 4" in line
    done = run_line(line, tmp_path, launch_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "toy-dp.json").read_text())
    one, one_images = one_process_eval
    assert two["metrics"] == one["metrics"] and two.get("comparison") == one.get("comparison")
    assert sum(two["generated"].values()) < sum(one["generated"].values())  # the main process generated only its share
    assert image_bytes(tmp_path / "cache") == one_images  # every image identical, written once


@needs_launcher
@needs_toy
def test_multi_machine_launch_line_runs_as_two_machines_on_one_host(tmp_path: Path, one_process_eval: tuple[dict, dict[str, bytes]]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = line_with("--num_machines 2")
    env = launch_env(tmp_path, MAIN_IP="127.0.0.1", MAIN_PORT=str(port))
    machines = [subprocess.Popen(["bash", "-c", line], cwd=tmp_path, env={**env, "MACHINE_RANK": str(r)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [m.communicate(timeout=150) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    two = json.loads((tmp_path / "toy-dp.json").read_text())
    assert two["metrics"] == one_process_eval[0]["metrics"]
    assert image_bytes(tmp_path / "cache") == one_process_eval[1]


def _delta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "delta.safetensors"))


@needs_launcher
@needs_toy
def test_readme_erase_on_two_processes_takes_the_same_steps_as_one_process(tmp_path: Path) -> None:
    from erasekit.api import erase
    from erasekit.models import load_pipeline

    line = line_with("-m erasekit erase")
    done = run_line(line, tmp_path, launch_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "no-circle-dp"
    assert sorted(p.name for p in run.parent.iterdir()) == ["no-circle-dp"]  # one run folder, no leftover .partial
    one = erase(load_pipeline("toy"), "circle", method="eap", budget="toy", batch_size=4, iterations=6)
    two = _delta(run)
    assert two.keys() == one.delta.keys()
    base = load_pipeline("toy").unet.state_dict()
    moved = max((one.delta[k] - base[k.removeprefix("unet.")]).abs().max().item() for k in one.delta)
    assert moved > 1e-4  # the steps did change the weights, so agreement below means something
    for k, v in one.delta.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-3 * moved)  # float rounding of the summed gradients, far below a step
    history = json.loads((run / "history.json").read_text())
    assert [h["adversarial"] for h in history["steps"]] == [h["adversarial"] for h in one.history if "step" in h]
    assert [h["erase_loss"] for h in history["steps"]] == pytest.approx([h["erase_loss"] for h in one.history if "step" in h], rel=1e-3, abs=1e-6)


@needs_launcher
def test_eap_with_an_uneven_batch_on_two_processes_matches_one_process(tiny_dir: Path, words_file: Path, tmp_path: Path) -> None:
    from erasekit.api import erase

    settings = dict(iterations=3, ddim_steps=3, k=6, n_centres=3, concept_space=str(words_file), batch_size=3, rollout_reuse=2, lr=1e-3)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cmd = [LAUNCHER, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", "-m", "erasekit", "erase",
           "--model", str(tiny_dir), "--concept", "circle", "--concept", "square", "--method", "eap", "--out", str(tmp_path / "two"), "--device", "cpu", *flags]
    done = subprocess.run(cmd, env=launch_env(tmp_path), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    one = erase(tiny_pipeline(), ["circle", "square"], method="eap", **settings)
    batch_one = erase(tiny_pipeline(), ["circle", "square"], method="eap", **{**settings, "batch_size": 1})
    two = _delta(tmp_path / "two")
    for k, v in one.delta.items():
        torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(one.delta[k], batch_one.delta[k], rtol=1e-5, atol=1e-7) for k in one.delta)  # the batch size matters
    probabilities = json.loads((tmp_path / "two" / "history.json").read_text())["search"]["probabilities"]
    for got, want in zip(probabilities, one.history[-1]["search"]["probabilities"]):
        assert got.keys() == want.keys() and np.allclose(list(got.values()), list(want.values()), atol=1e-5)


STALL = """
import os, sys, time, torch
from erasekit import distributed as dist
from erasekit.errors import ErasekitError
rank, world, _ = dist.distributed(cpu=True)
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
if rank == 1:
    if sys.argv[1] == "die":
        os._exit(3)
    time.sleep(120)  # alive but stuck
try:
    dist.all_reduce_grads([p], torch.zeros(2))
except ErasekitError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@needs_launcher
@pytest.mark.parametrize("how", ["stall", "die"])
def test_a_process_that_stalls_or_dies_stops_the_others_with_a_clear_error(how: str, tmp_path: Path) -> None:
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    cmd = [LAUNCHER, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", str(script), how]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=launch_env(tmp_path, ERASEKIT_COLLECTIVE_TIMEOUT="4"), capture_output=True, text=True, timeout=100)
    assert done.returncode != 0 and time.perf_counter() - started < 60
    if how == "stall":  # the survivor times out on the collective and says why, in one line
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert errors and "another process died or stopped responding" in errors[0] and "ERASEKIT_COLLECTIVE_TIMEOUT" in errors[0]


# ---- single-process checks of the pieces (no launcher) ----

@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (5, 3), (2, 4), (0, 2)])
def test_shards_cover_every_row_once_even_when_the_world_does_not_divide_the_work(n: int, world: int) -> None:
    rows = [i for r in range(world) for i in dist.shard(n, r, world)]
    sizes = [len(dist.shard(n, r, world)) for r in range(world)]
    assert rows == list(range(n)) and max(sizes) - min(sizes) <= 1


def test_collective_timeout_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.collective_timeout() == dist.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(dist.TIMEOUT_ENV, "12.5")
    assert dist.collective_timeout() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(dist.TIMEOUT_ENV, bad)
        with pytest.raises(ErasekitError, match="ERASEKIT_COLLECTIVE_TIMEOUT must be a number of seconds"):
            dist.collective_timeout()


def test_device_under_several_processes_is_each_process_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.resolve_device("cuda:1") == "cuda:1"  # one process: the device as given
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.resolve_device("cuda") == "cuda:3" and dist.resolve_device("cpu") == "cpu"
    with pytest.raises(ErasekitError, match="names one device"):
        dist.resolve_device("cuda:0")


def test_one_process_ignores_the_distributed_helpers() -> None:
    assert dist.distributed()[:2] == (0, 1)
    part = {"object": np.arange(6.0).reshape(3, 2)}
    assert dist.gather_rows(part, 3, 0, 1)["object"] is part["object"]


def test_batch_size_averages_several_rollout_points_and_stays_deterministic(words_file: Path) -> None:
    from erasekit.api import erase

    settings = dict(iterations=2, ddim_steps=3, k=5, n_centres=3, batch_size=3, concept_space=str(words_file))
    a = erase(tiny_pipeline(), "circle", method="eap", **settings)
    b = erase(tiny_pipeline(), "circle", method="eap", **settings)
    c = erase(tiny_pipeline(), "circle", method="eap", **{**settings, "batch_size": 1})
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert any(not torch.equal(a.delta[k], c.delta[k]) for k in a.delta)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_the_forwards_low_and_keeps_fp32_weights(precision: str) -> None:
    from erasekit.api import erase

    settings = dict(iterations=2, ddim_steps=3, lr=1e-2)
    full = erase(tiny_pipeline(), "circle", method="esd-x", **settings)
    mixed = erase(tiny_pipeline(), "circle", method="esd-x", precision=precision, **settings)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in mixed.delta.values())
    assert any(not torch.equal(full.delta[k], mixed.delta[k]) for k in full.delta)  # the forwards really ran in low precision
    assert mixed.config["precision"] == precision
    # Adam's first steps are nearly sign(g) * lr: where |g| is tiny its sign is rounding noise, and how that noise falls
    # differs between CPUs with and without native bf16, so the deltas' direction is not a bound any CPU keeps (0.27-0.82 seen)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_low_precision_forward_gives_the_fp32_gradient_direction(precision: str) -> None:
    """What autocast must guarantee on any CPU: the UNet computes in the low dtype, the loss and gradients stay fp32 and agree."""
    from erasekit.concepts import encode_cond
    from erasekit.methods.base import TrainableUNet

    pipe = tiny_pipeline()
    trainable = TrainableUNet(pipe, "xattn", 4)
    g = torch.Generator().manual_seed(0)
    x, t, emb = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700]), encode_cond(pipe, ["circle", "square"])
    target = torch.randn(2, 4, 8, 8, generator=g)

    def gradient(precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        for p in trainable.params.values():
            p.grad = None
        with dist.autocast(precision, x.device):
            out = trainable.eps(x, t, emb)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in trainable.params.values()]), loss, out.dtype

    exact, exact_loss, _ = gradient("fp32")
    low, low_loss, dtype = gradient(precision)
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert low_loss.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in trainable.params.values())
    assert low_loss.item() == pytest.approx(exact_loss.item(), rel=1e-2)  # bf16 keeps 8 bits: ~0.4 % per rounding
    assert torch.nn.functional.cosine_similarity(exact, low, dim=0) > 0.99  # 0.9999 measured with and without AVX-512


def test_bad_data_parallel_settings_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, words_file: Path) -> None:
    from erasekit.api import erase

    with pytest.raises(ErasekitError, match="faithful mode follows the reference"):
        erase(tiny_pipeline(), "circle", method="eap", iterations=1, ddim_steps=2, k=5, n_centres=3, faithful=True, batch_size=2, concept_space=str(words_file))
    with pytest.raises(ErasekitError, match="unknown precision 'fp8'"):
        erase(tiny_pipeline(), "circle", method="esd-x", iterations=1, precision="fp8")
    with pytest.raises(ErasekitError, match="batch_size must be >= 1"):
        erase(tiny_pipeline(), "circle", method="esd-x", iterations=1, batch_size=0)
    monkeypatch.setattr(dist, "distributed", lambda cpu=True: (0, 2, lambda: None))  # as if launched on two processes
    with pytest.raises(ErasekitError, match="batch_size 1 is smaller than the 2 processes"):
        erase(tiny_pipeline(), "circle", method="esd-x", iterations=1, ddim_steps=2)
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ErasekitError, match="pass --precision bf16 to erasekit"):
        erase(tiny_pipeline(), "circle", method="esd-x", iterations=1, ddim_steps=2)
