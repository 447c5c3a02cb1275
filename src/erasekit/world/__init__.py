"""The toy world: a procedural image world, its captions, a trained toy SD pipeline and a judge."""

from erasekit.world.vocab import WorldVocab, load_vocab

__all__ = ["WorldVocab", "load_vocab"]
