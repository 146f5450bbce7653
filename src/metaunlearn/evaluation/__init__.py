"""Evaluation: concept detectors and the concept rates they measure.

Import order matters: `worlds.digits` imports `evaluation.digit_classifier`,
so nothing here imports `worlds.digits` at module level.
"""

from .concept_rates import evaluate_concepts, evaluation_roles, forget_concepts, write_results
from .detectors import Detector, DigitDetector, NudityDetector, make_detector

__all__ = ["Detector", "DigitDetector", "NudityDetector", "evaluate_concepts", "evaluation_roles",
           "forget_concepts", "make_detector", "write_results"]
