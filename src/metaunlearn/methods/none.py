"""`method: none`: no edit and no loss of its own, for a meta-only stage on a
model unlearned elsewhere (the paper's route for closed-form editors)."""

from __future__ import annotations

from ..registry import METHODS
from .base import Method


@METHODS.register("none", help="no base method: the meta objective alone, on a model unlearned elsewhere")
class NoMethod(Method):
    closed_form = True  # nothing to train for the method itself
    needs_meta = True

    @classmethod
    def title(cls, config) -> str:
        return "meta-only"
