"""Search aliases for the node library, passed only where the host's V3 schema has the field (feature-checked)."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

SUPPORTED = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def aliases(*words: str) -> dict[str, list[str]]:
    """``io.Schema(..., **aliases("ip-adapter", ...))``: other words users type for this node."""
    return {"search_aliases": list(words)} if SUPPORTED else {}
