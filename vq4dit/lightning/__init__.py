"""The Lightning adapter over :mod:`vq4dit.engine`: the calibration LightningModule and the
trajectory LightningDataModule (``train.py`` is a LightningCLI over these two)."""

from .data import CalibrationDataModule, DataSettings
from .module import CalibrationModule

__all__ = ["CalibrationDataModule", "CalibrationModule", "DataSettings"]
