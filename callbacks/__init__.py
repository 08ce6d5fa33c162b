"""Lightning callbacks of vq4dit: YAML can say ``class_path: callbacks.CandidatePruning``."""

from .block_windows import BlockWindows
from .calibration_report import CalibrationReport
from .calibration_stop import CalibrationStop
from .candidate_pruning import CandidatePruning
from .final_assignment import FinalAssignment
from .run_guard import RunGuard
from .sample_images import SampleImages
from .sample_writer import SampleWriter

__all__ = ["BlockWindows", "CalibrationReport", "CalibrationStop", "CandidatePruning", "FinalAssignment", "RunGuard", "SampleImages", "SampleWriter"]
