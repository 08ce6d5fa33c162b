"""Calibration without Lightning: teacher/student construction, block losses, the ratio
regulariser and its gate, optimizer groups, harden / prune / finalize (:class:`Calibrator`)."""

from .calibrator import Calibrator, StepLoss
from .config import CalibrationConfig
from .losses import RegularizerGate, block_losses, with_null_labels
from .statistics import input_second_moments, statistics_batches
from .student import build_student, cast_teacher_, load_packed_student

__all__ = [
    "CalibrationConfig",
    "Calibrator",
    "RegularizerGate",
    "StepLoss",
    "block_losses",
    "input_second_moments",
    "statistics_batches",
    "build_student",
    "cast_teacher_",
    "load_packed_student",
    "with_null_labels",
]
