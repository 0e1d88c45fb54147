"""Calibration and evaluation text."""

from lowbit._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["CORPORA", "DEFAULT_CORPUS", "load_text"], "lowbit.data.texts"),
    **dict.fromkeys(["TokenSplit", "calibration_samples", "eval_windows", "tokenize_split"], "lowbit.data.corpora"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
