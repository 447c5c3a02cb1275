"""Run folders and method settings shared by `erase`, `demo` and `compare`: flags and TOML into a method's
config, the request an interrupted run resumes from, and the all-or-nothing write of a finished run."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import typing
import uuid
from pathlib import Path
from typing import Any

from erasekit import __version__
from erasekit.errors import ErasekitError


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """Convert a flag or TOML value to the config field's type, or raise a one-line error."""
    origin = kind if isinstance(kind, type) else typing.get_origin(kind) or kind
    try:
        if origin is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(str(raw)) if not isinstance(raw, (int, float)) else int(raw)
        if origin is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if isinstance(raw, (dict, list)):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        raise ErasekitError(f"--{name.replace('_', '-')} expects {getattr(origin, '__name__', origin)}, got {raw!r}") from None


def parse_method_flags(config_class: type, args: list[str]) -> dict[str, Any]:
    """Parse `--field value`, `--field=value`, `--flag`/`--no-flag` for a method config dataclass."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(config_class) if f.metadata.get("flag", True)}
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ErasekitError(f"unexpected argument {token!r}; method settings look like --iterations 100")
        key, _, value = token[2:].partition("=")
        name = key.replace("-", "_")
        if name.startswith("no_") and name[3:] in fields and fields[name[3:]] is bool and not value:
            out[name[3:]] = False
            i += 1
            continue
        if name not in fields:
            known = ", ".join("--" + f.replace("_", "-") for f in fields)
            raise ErasekitError(f"unknown option --{key}; the settings here are: {known}")
        if not value:
            if fields[name] is bool and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(args):
                value = args[i + 1]
                i += 1
            else:
                raise ErasekitError(f"--{key} needs a value")
        out[name] = _coerce(name, fields[name], value)
        i += 1
    return out


def read_toml_config(path: Path, method: str, config_class: type) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys, or a table named after the method."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ErasekitError(f"cannot read config file {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ErasekitError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get(method, data) if isinstance(data.get(method), dict) else data
    hints = typing.get_type_hints(config_class)
    names = {f.name for f in dataclasses.fields(config_class)}
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            continue
        if name not in names:
            raise ErasekitError(f"config file {path}: unknown key {key!r} for {method}; known keys: {', '.join(sorted(names))}")
        out[name] = _coerce(name, hints[name], value)
    return out


def settings_lines(spec: Any, config: Any, budget: str | None, model: str) -> list[str]:
    """`erase --show-settings`: every setting with the value this run would use, and the paper's where it differs."""
    where = f"--budget {budget}" if budget else "the paper's values (--budget paper)"
    lines = [f"{spec.name} on --model {model} with {where}; flags and --config override these (value, then paper value where it differs):"]
    for f in dataclasses.fields(spec.config_class):
        if not f.metadata.get("flag", True):
            continue
        value, paper = getattr(config, f.name), f.default if f.default is not dataclasses.MISSING else None
        note = "" if value == paper else f"(paper: {paper!r}) "
        lines.append(f"--{f.name.replace('_', '-'):20s} {value!r:10} {note}{f.metadata.get('help', '')}")
    return lines


def _plain(value: Any) -> Any:
    """A value as request.json stores it (tuples become lists, unknown types strings), so recorded and given compare."""
    return json.loads(json.dumps(value, default=str))


def check_resume_matches(request: dict[str, Any], given: dict[str, Any], settings: dict[str, Any], config: Any | None) -> None:
    """Refuse `erase --resume OUT` given an option or method setting other than the interrupted run's, naming it.

    ``given``: the erase options typed on the command line (name -> value); ``settings``: method settings from flags
    and --config; ``config``: the whole config a --budget given with --resume would build (None without one).
    """
    recorded = {"concept": request.get("concepts"), "preserve": request.get("preserve"), "model": request.get("model"),
                "method": request.get("method"), "family": request.get("family"), "device": request.get("device"),
                "checkpoint_every": request.get("checkpoint_every"), "allow_unknown": request.get("allow_unknown", False)}
    wanted = {**(dataclasses.asdict(config) if config is not None else {}), **settings}
    changed = [(k, v, recorded[k]) for k, v in given.items() if k in recorded and _plain(v) != _plain(recorded[k])]
    changed += [(k, v, request["config"].get(k)) for k, v in wanted.items() if _plain(v) != _plain(request["config"].get(k))]
    if changed:
        name, value, before = changed[0]
        raise ErasekitError(f"--{name.replace('_', '-')} {value!r} differs from the interrupted run's {before!r}: --resume continues it with "
                            f"its recorded settings; drop --{name.replace('_', '-')} (or start a new run with another --out)")


def partial_dir(out: Path) -> Path:
    """Where a run keeps its request and checkpoints until it finishes."""
    return out.with_name(out.name + ".partial")


def write_request(work: Path, request: dict[str, Any]) -> None:
    """Record what the run was asked to do, so --resume can redo it exactly."""
    from erasekit.models import atomic_write_text

    # the process id tells a later run whether this one is still alive (erasekit.run_folders)
    record = {**request, "pid": os.getpid(), "host": platform.node()}
    atomic_write_text(work / "request.json", json.dumps(record, indent=1, default=str))


def read_request(out: Path) -> dict[str, Any]:
    """The request of an interrupted run, or a one-line error saying why it cannot resume."""
    from erasekit.checks import usable_path

    if not usable_path(out, "--resume folder").name:
        raise ErasekitError(f"--resume {str(out)!r} names no run folder; pass the --out of the interrupted run")
    if out.exists() and (out / "delta.safetensors").exists():
        raise ErasekitError(f"{out} already finished; nothing to resume")
    path = partial_dir(out) / "request.json"
    if not path.is_file():
        raise ErasekitError(f"no interrupted run for {out} (no {path}); start it with `erasekit erase --out {out} ...`")
    try:
        request = json.loads(path.read_text(encoding="utf-8"))
        request["config"], request["model"], request["method"]  # noqa: B018  (presence check)
    except (ValueError, KeyError, OSError) as exc:
        raise ErasekitError(f"{path} is damaged ({exc}); delete {partial_dir(out)} and start again") from None
    return request


def write_run(out: Path, result: Any, model: str, argv: list[str], resumed_by: list[str] | None = None) -> None:
    """Write delta, history and run record into a temp folder, then rename it to ``out`` (all or nothing).

    ``argv`` is the command that started the run; ``resumed_by`` the `--resume` command that finished it, if any.
    """
    import diffusers
    import torch
    import transformers

    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()  # the user's usual permissions (0o777 less the umask), where tempfile.mkdtemp gives 0700
    except OSError as exc:
        raise ErasekitError(f"cannot write the run folder {out}: {exc.strerror or exc}; free space or fix permissions, then "
                            f"`erasekit erase --resume {out}` continues from the checkpoints kept in {partial_dir(out)}") from None
    try:
        result.save(tmp / "delta.safetensors")
        steps = [h for h in result.history if "step" in h]
        search = [h["search"] for h in result.history if "search" in h]
        from erasekit.checks import strict_json

        diverged = f"the training diverged; lower --lr (or the loss weights), delete {partial_dir(out)} and start again"
        (tmp / "history.json").write_text(strict_json({"steps": steps, "search": search[0] if search else None}, "history.json", diverged, indent=1))
        record = {
            "command": " ".join(shlex.quote(a) for a in ["erasekit", *argv[1:]]),
            **({"resumed_by": " ".join(shlex.quote(a) for a in ["erasekit", *resumed_by[1:]])} if resumed_by else {}),
            "model": model,
            "method": result.method,
            "concepts": list(result.concepts),
            "preserve": list(result.preserve),
            "config": result.config,
            "base_hash": result.base_hash,
            "timings": result.timings,
            "versions": {"erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
        }
        (tmp / "run.json").write_text(strict_json(record, "run.json", diverged, indent=1, default=str))
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ErasekitError(f"cannot write the run folder {out}: {exc.strerror or exc}; free space or fix permissions, then "
                            f"`erasekit erase --resume {out}` continues from the checkpoints kept in {partial_dir(out)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
