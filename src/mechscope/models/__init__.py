"""Host models behind one :class:`ModelAdapter` interface, one file per architecture family."""

from mechscope.models.adapter import CleanRun, FrozenState, ModelAdapter
from mechscope.models.loading import KNOWN_MODELS, load_model

__all__ = ["ModelAdapter", "CleanRun", "FrozenState", "load_model", "KNOWN_MODELS"]
