"""The pack's one error helper: every refusal names the node, the input, what was expected and how to fix it."""
from __future__ import annotations

import math


def error_text(node: str, input_name: str | None, message: str) -> str:
    """``"<node>: input '<input>': <message>"`` (or ``"<node>: <message>"`` when no single input is at fault)."""
    return f"{node}: input '{input_name}': {message}" if input_name else f"{node}: {message}"


def node_error(node: str, input_name: str | None, message: str) -> ValueError:
    """A ValueError with ``error_text``: raise it at the node boundary, before any model work."""
    return ValueError(error_text(node, input_name, message))


def number_error(node: str, input_name: str, value: float, low: float, high: float) -> str | None:
    """``error_text`` for a number that is NaN, infinite or outside ``[low, high]``; None when it is fine.

    For ``validate_inputs``: ComfyUI skips its own min/max check for every input a node's ``validate_inputs``
    declares, and NaN passes any comparison, so a declared float is checked here.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        return error_text(node, input_name, f"expected a number in [{low}, {high}], got {value!r}")
    if not math.isfinite(v):
        return error_text(node, input_name, f"expected a finite number in [{low}, {high}], got {v}; type a number")
    if not low <= v <= high:
        return error_text(node, input_name, f"expected a number in [{low}, {high}], got {v}; set it within the range")
    return None
