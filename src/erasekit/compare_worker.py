"""One method's erasure for `erasekit compare`, in its own interpreter (``python -m erasekit.compare_worker``) or in process.

The child prints its progress as ``MARK``-prefixed JSON lines on stdout and writes its result (erase time, memory) as
JSON; the parent reads its peak RSS from the child's own VmHWM (``ru_maxrss`` from ``os.wait4`` as the fallback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError, one_line

MARK = "@erasekit-progress "  # prefix of the child's progress lines on its stdout


def _mib(maxrss: int) -> float:
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, KiB on Linux


def erase_argv(spec: Mapping[str, Any]) -> list[str]:
    """The `erasekit erase` command equivalent to one method's run (recorded in its run.json)."""
    argv = ["erasekit", "erase", "--model", spec["model"], *[a for c in spec["concepts"] for a in ("-c", c)], "--method", spec["method"],
            "--out", spec["out"], *[a for p in spec["preserve"] for a in ("--preserve", p)]]
    argv += ["--budget", spec["budget"]] if spec["budget"] else []
    argv += ["--allow-unknown"] if spec.get("allow_unknown") else []
    return argv + [f"--{k.replace('_', '-')}={v}" for k, v in spec["settings"].items()]


def erase_one(spec: Mapping[str, Any], progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Load the model, erase with one method, write the run folder; returns the erase time and the RSS before erasing."""
    import resource

    import torch

    from erasekit.api import erase
    from erasekit.bench import own_peak_rss_mib
    from erasekit.methods import get_method, make_config
    from erasekit.models import load_pipeline
    from erasekit.runs import write_run

    pipe = load_pipeline(spec["model"], device=spec["device"], autoregressive=True)  # a Janus too: its rows are autoregressive methods
    loaded = own_peak_rss_mib() or _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    config = make_config(get_method(spec["method"]), spec["budget"], **spec["settings"])
    torch.manual_seed(spec["seed"])

    def report(step: int, total: int, record: dict[str, Any]) -> None:
        if progress:
            losses = " ".join(f"{k.removesuffix('_loss')} {record[k]:.3g}" for k in ("erase_loss", "preserve_loss") if isinstance(record.get(k), float))
            progress(step, total, losses)

    started = time.perf_counter()
    result = erase(pipe, spec["concepts"], method=spec["method"], config=config, preserve=spec["preserve"], progress=report,
                   allow_unknown=spec.get("allow_unknown", False))
    erase_s = time.perf_counter() - started
    write_run(Path(spec["out"]), result, spec["model"], erase_argv(spec))
    out = {"erase_s": erase_s, "loaded_rss_mib": loaded, "own_peak_rss_mib": own_peak_rss_mib(), "timings": dict(result.timings)}
    if spec["device"].startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run_isolated(spec: dict[str, Any], log: Path, progress: Callable[[int, int, str], None]) -> dict[str, Any]:
    """Run :func:`erase_one` in a fresh interpreter; its stderr goes to ``log``; adds its peak RSS (os.wait4)."""
    spec_file, result_file = log.with_suffix(".spec.json"), log.with_suffix(".result.json")
    spec_file.write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen([sys.executable, "-m", "erasekit.compare_worker", str(spec_file), str(result_file)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(MARK):
                step, total, info = json.loads(line[len(MARK):])
                progress(step, total, info)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    record = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if proc.returncode != 0 or "error" in record or "erase_s" not in record:
        last = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise ErasekitError(record.get("error") or (last[-1] if last else f"the worker exited with status {proc.returncode}"))
    # VmHWM of the worker itself: Linux's ru_maxrss would carry over the parent's high-water mark through exec
    own = record.get("own_peak_rss_mib")
    return {**record, "peak_rss_mib": own if own is not None else _mib(usage.ru_maxrss), "process_s": time.perf_counter() - started,
            "memory": "peak RSS of the method's own process (VmHWM)" if own is not None else "peak RSS (os.wait4 ru_maxrss)"}


def _run_in_process(spec: dict[str, Any], progress: Callable[[int, int, str], None]) -> dict[str, Any]:
    import resource

    started = time.perf_counter()
    record = erase_one(spec, progress)
    return {**record, "peak_rss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "process_s": time.perf_counter() - started,
            "memory": "high-water RSS of the calling process (in-process mode; includes earlier work)"}


def _worker(spec_file: str, result_file: str) -> int:
    """Child side of :func:`_run_isolated`: run one erasure, print progress lines, write the result JSON."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(int(spec["threads"]))
    try:
        record = erase_one(spec, lambda step, total, info: print(MARK + json.dumps([step, total, info]), flush=True))
        code = 0
    except Exception as exc:  # noqa: BLE001  reported to the parent as one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        record = {"error": one_line(exc)}
        code = 1
    Path(result_file).write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
