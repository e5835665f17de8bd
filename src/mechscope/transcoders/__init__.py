"""Transcoders: per-layer (and, through the same interface, cross-layer) sparse replacements of MLPs."""

from mechscope.transcoders.io import load_gemma_scope_2, load_transcoder_set, save_transcoder_set
from mechscope.transcoders.transcoder import PerLayerTranscoder, PerLayerTranscoderSet, TranscoderSet

__all__ = [
    "PerLayerTranscoder",
    "TranscoderSet",
    "PerLayerTranscoderSet",
    "save_transcoder_set",
    "load_transcoder_set",
    "load_gemma_scope_2",
]
