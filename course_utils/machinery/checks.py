"""Argument checks shared by the course's modules: a size or a count that cannot mean anything is refused
with a ``ValueError`` where it is given (naming the argument, the value and what would do), not three calls
later inside torch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence


def whole_number(value, name: str, *, minimum: int = 1, example: str = "") -> int:
    """``value`` as an ``int`` if it is a whole number of at least ``minimum`` (``bool`` and floats are
    refused, numpy integers accepted); ``ValueError`` otherwise."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number of at least {minimum}"
        hint = f", e.g. {name}={example}" if example else ""
        raise ValueError(f"{name} must be {what}{hint}; got {value!r}")
    return number


def optional_whole_number(
    value, name: str, *, minimum: int = 1, example: str = "", none_means: str = ""
) -> int | None:
    """``None`` (when allowed: ``none_means`` says what it means) or :func:`whole_number`."""
    if value is None:
        return None
    try:
        return whole_number(value, name, minimum=minimum, example=example)
    except ValueError as err:
        raise ValueError(f"{err} (or None: {none_means})" if none_means else str(err)) from None


def stage_lengths(epochs, name: str = "epochs", count: int = 3) -> tuple[int, ...]:
    """``count`` stage lengths (positive whole numbers), e.g. ``(5, 15, 30)``."""
    example = "(5, 15, 30)" if count == 3 else "(" + ", ".join(["5"] * count) + ")"
    message = (
        f"{name} must be {count} stage lengths (positive whole numbers of epochs), e.g. {name}={example}; "
        f"got {epochs!r}"
    )
    if isinstance(epochs, (str, bytes)) or not isinstance(epochs, Sequence) or len(epochs) != count:
        raise ValueError(message)
    try:
        return tuple(whole_number(e, name) for e in epochs)
    except ValueError:
        raise ValueError(message) from None


def positive_number(value, name: str, *, example: str = "") -> float:
    """``value`` as a ``float`` if it is a positive finite number (``bool`` refused); ``ValueError`` naming
    ``name`` otherwise (a learning rate, a ratio, a multiplier)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        hint = f", e.g. {name}={example}" if example else ""
        raise ValueError(f"{name} must be a positive (finite) number{hint}; got {value!r}")
    return float(value)
