"""Evaluation: metrics (named values over a model's samples) and concept
detectors, both plugins; the built-in ones are imported here."""

from __future__ import annotations

from . import concept_rate, nudenet  # noqa: F401  (each registers itself)
from .base import Context, Metric, Result, Samples, Value
from .concept_rate import ConceptRate, Detector
from .evaluate import Evaluator, evaluation_roles, forget_concepts

__all__ = ["ConceptRate", "Context", "Detector", "Evaluator", "Metric", "Result", "Samples", "Value",
           "evaluation_roles", "forget_concepts"]
