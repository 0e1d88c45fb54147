"""Layer-sequential calibration shared by every calibrated method."""

from lowbit.calibration.engine import CalibrationResult, calibrate_and_quantize, capture_block_inputs
from lowbit.calibration.methods import GPTQMethod, GPTQOptions
from lowbit.calibration.statistics import HessianAccumulator

__all__ = ["CalibrationResult", "GPTQMethod", "GPTQOptions", "HessianAccumulator", "calibrate_and_quantize", "capture_block_inputs"]
