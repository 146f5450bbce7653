"""Relearning attacks. Adding a kind: a module with an `Attack` subclass that
registers itself (`@ATTACKS.register(kind, OptionsClass)`); the built-in ones
are imported here."""

from __future__ import annotations

from . import finetune  # noqa: F401  (registers 'full' and 'lora')
from .base import ATTACK_SEED_SPACE, Attack, attacker_data, make_attack, run_attack

__all__ = ["ATTACK_SEED_SPACE", "Attack", "attacker_data", "make_attack", "run_attack"]
