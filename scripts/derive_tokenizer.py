"""Derive CLIP's vocab.json and merges.txt from ``bpe_simple_vocab_16e6.txt.gz``.

Run once (offline) on the file that ships inside the open-clip-torch wheel:

    pip download --no-deps open-clip-torch==3.3.0 && unzip -j open_clip_torch-*.whl '*/bpe_simple_vocab_16e6.txt.gz'
    python scripts/derive_tokenizer.py bpe_simple_vocab_16e6.txt.gz src/erasekit/world/assets/tokenizer

The output is what ``transformers.CLIPTokenizer`` reads; erasekit never imports open_clip.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps the first 48,894 merges: 49,408 tokens = 2*256 byte symbols + merges + 2 specials.
NUM_MERGES = 49408 - 2 * 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for raw bytes, in CLIP's vocabulary order.

    Printable bytes come first (as themselves), then the others, mapped to chr(256 + n).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def derive(bpe_gz: Path, out_dir: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs into ``out_dir``."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]))
