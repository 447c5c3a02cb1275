"""Where a toy world's frozen text tower puts each designed look-alike partner, in what the UNet reads.

    python benchmarks/text_geometry.py                      # the shipped toy world
    python benchmarks/text_geometry.py --text-encoder RUN/work/text_model

ESD-x edits the cross-attention keys and values, so an erasure reaches another prompt through the
overlap of the two prompts' token states. For every object's evaluation prompt ("an image of a {object}",
padded to 77 tokens as the pipeline pads it) this prints, per designed pair (a, b), b's rank among the
nine other objects by three cosines to a: the whole token sequence (each token's state centred on the
ten prompts' mean, so the shared prefix counts for nothing), the object token's own state, and the
pooled CLIP text embedding (before projection); and the reach of an edit made on ESD-x's own prompt (the bare
word a, whose token states E_a span what the edit changes) on what sets b's prompt apart: ||E_a (E_b - mean)^T||.
Rank 1: the partner is a's nearest object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def ranks(sim: torch.Tensor, objects: list[str], pairs: list[tuple[str, str]]) -> list[tuple[int, str]]:
    """Per pair, the partner's rank among the other objects by ``sim`` and the nearest object."""
    out = []
    for a, b in pairs:
        i = objects.index(a)
        others = sorted((j for j in range(len(objects)) if j != i), key=lambda j: -float(sim[i, j]))
        out.append((1 + [objects[j] for j in others].index(b), objects[others[0]]))
    return out


def main() -> None:
    """Print the partners' ranks under the three cosines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-encoder", type=Path, default=None, help="a text_encoder/ or text_model/ folder (default: the shipped world's)")
    args = parser.parse_args()
    if args.text_encoder is not None and not (args.text_encoder / "config.json").is_file():  # before the imports that print
        print(f"error: {args.text_encoder} holds no text encoder (config.json); pass a text_model/ or text_encoder/ folder", file=sys.stderr)
        raise SystemExit(2)
    from transformers import CLIPTextModel

    from erasekit.models import quiet_loading
    from erasekit.world import toy
    from erasekit.world.captions import object_prompt
    from erasekit.world.check import default_toy_dir
    from erasekit.world.vocab import load_vocab

    args.text_encoder = args.text_encoder or default_toy_dir() / "pipeline" / "text_encoder"
    vocab = load_vocab()
    objects, pairs = vocab.objects, vocab.lookalike_pairs()
    tokenizer = toy.build_tokenizer()
    with quiet_loading():
        text = CLIPTextModel.from_pretrained(args.text_encoder, dtype=torch.float32).eval()
    prompts = [object_prompt(o) for o in objects]
    ids = torch.tensor(tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    words = torch.tensor(tokenizer(objects, padding="max_length", max_length=77, truncation=True).input_ids)
    with torch.inference_mode():
        out = text(ids)
        bare = text(words).last_hidden_state  # ESD's training prompt is the concept itself
    states, pooled = out.last_hidden_state, out.pooler_output
    obj_pos = [len(tokenizer(p).input_ids) - 2 for p in prompts]  # the last word before EOS
    centred = (states - states.mean(0, keepdim=True)).flatten(1)
    row = torch.stack([states[k, obj_pos[k]] for k in range(len(objects))])
    row = row - row.mean(0, keepdim=True)
    sims = {
        "sequence": F.normalize(centred, dim=-1) @ F.normalize(centred, dim=-1).T,
        "object token": F.normalize(row, dim=-1) @ F.normalize(row, dim=-1).T,
        "pooled": F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T,
        "edit reach": torch.stack([torch.linalg.matrix_norm(bare[a] @ (states - states.mean(0)).transpose(1, 2)) for a in range(len(objects))]),
    }
    print(f"text encoder: {args.text_encoder}")
    print("pair               | " + " | ".join(f"{k:>22}" for k in sims))
    table = {k: ranks(s, objects, pairs) for k, s in sims.items()}
    for n, (a, b) in enumerate(pairs):
        cells = [f"rank {table[k][n][0]} (nearest {table[k][n][1]})" for k in sims]
        print(f"{a + ' -> ' + b:18} | " + " | ".join(f"{c:>22}" for c in cells))
    for k, s in sims.items():
        partner = [float(s[objects.index(a), objects.index(b)]) for a, b in pairs]
        print(f"{k}: partner cosine {', '.join(f'{v:.2f}' for v in partner)}; "
              f"mean over all other pairs {float((s.sum() - s.trace()) / (len(objects) ** 2 - len(objects))):.2f}")


if __name__ == "__main__":
    main()
