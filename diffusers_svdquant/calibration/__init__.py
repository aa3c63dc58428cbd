"""Calibration: activation statistics over real inputs, and the per-layer smoothing search.

:func:`calibrate` records the statistics (:mod:`.recording`) and searches each layer's smoothing
(:mod:`.search`); :class:`CalibrationStats` holds them and reads / writes their file (:mod:`.stats`).
"""

from .recording import calibrate
from .search import search_smoothing
from .stats import CalibrationStats, load_calibration

__all__ = ["CalibrationStats", "calibrate", "load_calibration", "search_smoothing"]
