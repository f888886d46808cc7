"""Small argument checks shared by the optimizer and the arguments."""

from __future__ import annotations

import math
from typing import Any


def require_finite(name: str, value: Any, where: str = "") -> float:
    """Returns `value` as a float, or raises a `ValueError` naming `name` if it is NaN or infinite (or no number).

    A NaN or infinite learning rate, weight or epsilon is never meant: one step with it turns every parameter it
    touches into NaN. `where` is appended to the name in the message (e.g. `" (param group 1)"`).
    """
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}{where} must be a number; got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(
            f"{name}{where} must be a finite number; got {value!r}. A NaN or infinite {name} would turn every "
            "parameter it touches into NaN in one step."
        )
    return number
