"""The pack's one error helper: every refusal names the node, the input, what was expected and how to fix it."""
from __future__ import annotations


def error_text(node: str, input_name: str | None, message: str) -> str:
    """``"<node>: input '<input>': <message>"`` (or ``"<node>: <message>"`` when no single input is at fault)."""
    return f"{node}: input '{input_name}': {message}" if input_name else f"{node}: {message}"


def node_error(node: str, input_name: str | None, message: str) -> ValueError:
    """A ValueError with ``error_text``: raise it at the node boundary, before any model work."""
    return ValueError(error_text(node, input_name, message))
