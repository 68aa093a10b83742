"""Construction-time checks of hyperparameters."""

from __future__ import annotations

from typing import Any


def check_hyperparameter(name: str, value: Any, valid: bool, allowed: str) -> None:
    """Raise a ``ValueError`` naming ``name`` and its allowed range unless ``valid``."""
    if not valid:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
