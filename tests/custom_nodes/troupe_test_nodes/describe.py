"""A JSON-able summary of any node value (tensors as shape/dtype/stats), for server tests to assert on."""
from __future__ import annotations

from typing import Any

import torch

MAX_ITEMS = 16


def describe_tensor(t: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.numel() and not t.is_complex():
        f = t.detach().float()
        out.update(mean=f.mean().item(), std=f.std().item() if f.numel() > 1 else 0.0,
                   min=f.min().item(), max=f.max().item(), finite=bool(torch.isfinite(f).all()))
    return out


def describe_patcher(m) -> dict[str, Any]:
    """MODEL: the model class and which patches its transformer_options carry."""
    to = m.model_options.get("transformer_options", {})
    return {
        "type": type(m).__name__, "model": type(m.model).__name__,
        "patches": {k: len(v) for k, v in to.get("patches", {}).items()},
        "patches_replace": {k: sorted(str(key) for key in v) for k, v in to.get("patches_replace", {}).items()},
    }


def describe(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return {"type": type(value).__name__}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return describe_tensor(value)
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {str(k): describe(v, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple)):
        return {"len": len(value), "items": [describe(v, depth + 1) for v in value[:MAX_ITEMS]]}
    if hasattr(value, "model_options") and hasattr(value, "model"):
        return describe_patcher(value)
    if hasattr(value, "__dict__") and type(value).__module__.startswith("comfy.clip_vision"):
        return {"type": type(value).__name__, **{k: describe(v, depth + 1) for k, v in vars(value).items()}}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
