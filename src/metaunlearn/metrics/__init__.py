"""Evaluation: metrics (named values over a model's samples) and concept
detectors, both plugins; the built-in ones are imported here."""

from __future__ import annotations

# each built-in metric, detector and feature extractor registers itself
from . import clip_score, concept_rate, features, fid, hf_classifier, nudenet, zero_shot  # noqa: F401
from .base import Context, Metric, Result, Samples, Value
from .concept_rate import ConceptRate, Detector
from .evaluate import Evaluator, evaluation_roles, forget_concepts

__all__ = ["ConceptRate", "Context", "Detector", "Evaluator", "Metric", "Result", "Samples", "Value",
           "evaluation_roles", "forget_concepts"]
