"""Layer-sequential calibration shared by every calibrated method."""

from lowbit._lazy import lazy_exports

_EXPORTS = {
    "CalibrationConfig": "lowbit.calibration.config",
    **dict.fromkeys(["CalibrationResult", "calibrate_and_quantize", "capture_block_inputs"], "lowbit.calibration.engine"),
    **dict.fromkeys(["HessianAccumulator", "InputStatistics"], "lowbit.calibration.statistics"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
