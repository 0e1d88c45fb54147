"""Models: the architecture table, packaged models and offline loading."""

from lowbit.models.architectures import ARCHITECTURES, Architecture, architecture_for
from lowbit.models.loading import LoadedModel, load_model
from lowbit.models.registry import DEFAULT_MODEL, NAMED_MODELS

__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "NAMED_MODELS", "Architecture", "LoadedModel", "architecture_for", "load_model"]
