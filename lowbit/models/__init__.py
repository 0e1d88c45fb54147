"""Models: the architecture table, packaged models and offline loading."""

from lowbit._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["ARCHITECTURES", "Architecture", "architecture_for"], "lowbit.models.architectures"),
    "LoadedModel": "lowbit.models.loading",
    **dict.fromkeys(["DEFAULT_MODEL", "NAMED_MODELS"], "lowbit.models.registry"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
