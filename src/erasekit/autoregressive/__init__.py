"""The autoregressive family: Janus (``JanusForConditionalGeneration``), loaded and run with transformers' own classes.

:mod:`.janus` loads a folder, encodes prompts, samples image tokens with CFG, gives teacher-forced image-token logits,
decodes to pixels and names the trainable sets; :mod:`.lora` puts a PEFT LoRA on the language model's attention
projections (the ``lora`` set) and merges it into a weights delta; :mod:`.delta` applies a Janus weights delta;
:mod:`.tiny` builds a tiny random Janus offline (tests).
"""

from __future__ import annotations

from erasekit.autoregressive.janus import (
    TRAIN_SETS,
    Janus,
    Prompts,
    check_resolution,
    decode_tokens,
    encode_prompts,
    generate,
    guided_logits,
    image_logits,
    image_size,
    image_token_count,
    load_janus,
    sample_image_tokens,
    train_parameters,
    unconditional,
)

__all__ = [
    "TRAIN_SETS", "Janus", "Prompts", "check_resolution", "decode_tokens", "encode_prompts", "generate", "guided_logits",
    "image_logits", "image_size", "image_token_count", "load_janus", "sample_image_tokens", "train_parameters", "unconditional",
]
