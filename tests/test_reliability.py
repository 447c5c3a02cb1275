"""Disk-full and permission errors on outputs: the previous files stay byte for byte, no temp file is left,
and the CLI says so in one `error:` line with exit code 2.

A disk that fills up mid-write is simulated by letting erasekit's atomic writer write half of the bytes and
then fail with ENOSPC. A read-only folder is a real ``chmod 555`` unless the tests run as root (where chmod
does not bite); then opening a file in that folder fails with EACCES, as it would.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import erasekit
import erasekit.atomic as atomic
from conftest import tiny_pipeline
from erasekit.atomic import OutputError, atomic_folder, atomic_write_bytes, atomic_write_files, atomic_write_text
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.world.judge import Judge
from erasekit.world.vocab import load_vocab

runner = CliRunner()
EVAL = ["--suite", "toy-objects", "--images-per-class", "1", "--steps", "2"]


class _HalfWritten:
    """A file whose writes put half of the bytes on disk and then fail: the disk filled up mid-write."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> _HalfWritten:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


Trouble = Callable[..., None]


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Trouble:
    """disk_full(folder=None, name=None): atomic writes into ``folder`` (of files called ``name``) fail mid-write with ENOSPC."""

    def install(folder: Path | None = None, name: str | None = None) -> None:
        real_open = open

        def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            path = Path(path)
            target = path.name.split(".")[1:-3] if path.name.endswith(".tmp") else []
            hit = (folder is None or path.parent == folder) and (name is None or ".".join(target) == name)
            fh = real_open(path, mode, *args, **kwargs)
            return _HalfWritten(fh) if hit and "w" in mode else fh

        monkeypatch.setattr(atomic, "open", fake_open, raising=False)

    return install


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Trouble]:
    """read_only(folder): nothing new can be created in ``folder`` (chmod 555, or EACCES on open when running as root)."""
    restore: list[tuple[Path, int]] = []

    def install(folder: Path) -> None:
        if os.geteuid() != 0:
            restore.append((folder, folder.stat().st_mode))
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
            return
        real_open = open

        def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if Path(path).parent == folder and ("w" in mode or "x" in mode or "a" in mode):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(atomic, "open", fake_open, raising=False)

    yield install
    for folder, mode in restore:
        folder.chmod(mode)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temp_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def _one_error_line(result: Any, *needles: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}\n{result.output[-1500:]}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- the atomic writer itself ------------------------------------------------------------------------------------


def test_disk_full_mid_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path: Path, disk_full: Trouble) -> None:
    path = tmp_path / "result.json"
    atomic_write_text(path, '{"old": true}')
    disk_full()
    with pytest.raises(OutputError) as info:
        atomic_write_bytes(path, b"x" * 100_000)
    assert path.read_bytes() == b'{"old": true}'
    assert os.listdir(tmp_path) == ["result.json"]
    error = info.value
    assert isinstance(error, ErasekitError) and isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error).startswith(f"cannot write {path}: No space left on device; free some disk space") and "\n" not in str(error)


def test_read_only_folder_is_one_line_and_creates_nothing(tmp_path: Path, read_only: Trouble) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "grid.png").write_bytes(b"previous")
    read_only(folder)
    with pytest.raises(OutputError, match=r"cannot write .*grid\.png: Permission denied; choose a folder you can write to"):
        atomic_write_bytes(folder / "grid.png", b"new")
    assert _snapshot(folder) == {"grid.png": b"previous"} and not _temp_files(folder)


def test_a_failed_rename_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "delta.safetensors"
    path.write_bytes(b"previous")

    def no_rename(src: Any, dst: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OutputError, match="Read-only file system; choose a folder you can write to"):
        atomic_write_bytes(path, b"new bytes")
    assert os.listdir(tmp_path) == ["delta.safetensors"] and path.read_bytes() == b"previous"


def test_files_that_belong_together_are_written_both_or_neither(tmp_path: Path, disk_full: Trouble) -> None:
    grid, record = tmp_path / "attack.png", tmp_path / "attack.json"
    atomic_write_files({grid: b"old grid", record: b"old record"})
    disk_full(name="attack.json")  # the second file hits the full disk after the first was written
    with pytest.raises(OutputError, match="attack.json: No space left on device"):
        atomic_write_files({grid: b"new grid", record: b"new record"})
    assert _snapshot(tmp_path) == {"attack.json": b"old record", "attack.png": b"old grid"}


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"old")
    with atomic_folder(folder) as tmp:
        assert tmp != folder and list(tmp.iterdir()) == []
        (tmp / "new.bin").write_bytes(b"new")
        assert (folder / "old.bin").read_bytes() == b"old"  # untouched while the new one is written
    assert _snapshot(tmp_path) == {"pipeline/new.bin": b"new"} and os.listdir(tmp_path) == ["pipeline"]
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(folder) as tmp:  # the write itself fails
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert _snapshot(tmp_path) == {"pipeline/new.bin": b"new"} and os.listdir(tmp_path) == ["pipeline"]
    real = os.replace

    def no_second_rename(src: Any, dst: Any) -> None:
        if Path(src).name == "pipeline.tmp":  # the new folder cannot be renamed in; putting the old one back can
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(os, "replace", no_second_rename)
    with pytest.raises(OutputError, match="pipeline: No space left on device"), atomic_folder(folder) as tmp:
        (tmp / "newer.bin").write_bytes(b"newer")
    assert _snapshot(tmp_path) == {"pipeline/new.bin": b"new"} and os.listdir(tmp_path) == ["pipeline"]  # the old folder is put back, no temp folder left


# --- the commands ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pipeline, an untrained judge with the toy heads, a UCE run folder evaluated once, and its report."""
    root = tmp_path_factory.mktemp("reliability")
    tiny_pipeline().save_pretrained(root / "sd")
    torch.manual_seed(0)
    vocab = load_vocab()
    Judge(n_objects=len(vocab.objects), n_colours=len(vocab.colours), n_styles=len(vocab.styles)).eval().save(root / "judge")
    run = root / "runs" / "uce"
    run.parent.mkdir()
    run.mkdir()
    erasekit.erase(erasekit.load_pipeline(str(root / "sd")), "circle", method="uce").save(run / "delta.safetensors")
    (run / "run.json").write_text(json.dumps({"model": str(root / "sd")}))
    common = ["--judge", str(root / "judge"), "--cache-dir", str(root / "cache"), *EVAL]
    assert runner.invoke(app, ["evaluate", str(run), *common]).exit_code == 0
    (root / "reports").mkdir()
    assert runner.invoke(app, ["report", str(run), "--out", str(root / "reports" / "report.html")]).exit_code == 0
    return {"root": root, "sd": root / "sd", "run": run, "reports": root / "reports", "common": common}  # type: ignore[dict-item]


@pytest.mark.parametrize("trouble", ["disk_full", "read_only"])
def test_evaluate_keeps_the_previous_result_when_its_output_cannot_be_written(world: dict[str, Any], trouble: str,
                                                                              request: pytest.FixtureRequest) -> None:
    run = world["run"]
    before = _snapshot(run)
    assert {"eval-toy-objects.json", "eval-toy-objects.png"} <= set(before)
    request.getfixturevalue(trouble)(run)
    res = runner.invoke(app, ["evaluate", str(run), *world["common"]])
    _one_error_line(res, "cannot write", "eval-toy-objects")
    assert _snapshot(run) == before and not _temp_files(run)


@pytest.mark.parametrize("trouble", ["disk_full", "read_only"])
def test_report_keeps_the_previous_report_when_it_cannot_be_written(world: dict[str, Any], trouble: str, request: pytest.FixtureRequest) -> None:
    folder = world["reports"]
    before = _snapshot(folder)
    assert set(before) == {"report.html", "report.md"}
    request.getfixturevalue(trouble)(folder)
    res = runner.invoke(app, ["report", str(world["run"]), "--out", str(folder / "report.html"), "--overwrite"])
    _one_error_line(res, "cannot write", str(folder))
    assert _snapshot(folder) == before and not _temp_files(folder)


@pytest.mark.parametrize("trouble", ["disk_full", "read_only"])
def test_generate_keeps_the_previous_grid(world: dict[str, Any], tmp_path: Path, trouble: str, request: pytest.FixtureRequest) -> None:
    args = ["generate", "--model", str(world["sd"]), "-p", "a circle", "--images", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(tmp_path)
    request.getfixturevalue(trouble)(tmp_path)
    res = runner.invoke(app, [*args, "--seed", "7", "--overwrite"])
    _one_error_line(res, f"cannot write {tmp_path / 'g.png'}")
    assert _snapshot(tmp_path) == before and not _temp_files(tmp_path)


def test_erase_out_on_a_full_disk_writes_nothing_and_the_run_resumes(world: dict[str, Any], tmp_path: Path, disk_full: Trouble,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "earlier-run.txt").write_text("kept")
    out = tmp_path / "run"
    args = ["erase", "--model", str(world["sd"]), "-c", "circle", "--method", "esd-x", "--out", str(out), "--iterations", "2",
            "--ddim-steps", "2", "--checkpoint-every", "1"]
    disk_full(name="delta.safetensors")  # the run trains, then the disk is full when its delta is written
    res = runner.invoke(app, args)
    _one_error_line(res, "No space left on device", "delta.safetensors")
    assert not out.exists(), "a failed write must not leave a half-made run folder"
    assert (tmp_path / "earlier-run.txt").read_text() == "kept"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temp folder or file is left behind"
    assert (tmp_path / "run.partial" / "checkpoint.safetensors").is_file(), "the trained steps are kept to resume"
    monkeypatch.setattr(atomic, "open", open, raising=False)  # space freed
    resumed = runner.invoke(app, ["erase", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert erasekit.load_result(out / "delta.safetensors").method == "esd-x" and not (tmp_path / "run.partial").exists()


def test_erase_whose_run_files_cannot_be_written_says_how_to_resume(world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == "history.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    res = runner.invoke(app, ["erase", "--model", str(world["sd"]), "-c", "circle", "--method", "esd-x", "--out", str(out),
                              "--iterations", "2", "--ddim-steps", "2", "--checkpoint-every", "1"])
    _one_error_line(res, "cannot write the run folder", f"erasekit erase --resume {out}")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert (tmp_path / "run.partial" / "request.json").is_file()


@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_a_result_and_its_companion_file_stay_a_pair_when_the_second_write_fails(world: dict[str, Any], command: str, disk_full: Trouble) -> None:
    folder, second = (world["run"], "eval-toy-objects.json") if command == "evaluate" else (world["reports"], "report.md")
    before = _snapshot(folder)
    disk_full(folder, name=second)
    args = ["evaluate", str(world["run"]), *world["common"], "--seed", "5"] if command == "evaluate" else \
        ["report", str(world["run"]), str(world["run"]), "--out", str(folder / "report.html"), "--overwrite"]
    _one_error_line(runner.invoke(app, args), "No space left on device")
    assert _snapshot(folder) == before
