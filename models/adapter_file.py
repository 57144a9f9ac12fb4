"""Adapter files in models/troupe: safe reading, format detection and the shared loaded-adapter contract.

Every adapter family (SDXL in ``models/sdxl_*``, FLUX in ``models/flux_*``) provides an ``AdapterFamily``
whose ``detect`` names the format a state dict is in (or None) and whose ``load`` builds the adapter.
``TroupeLoadAdapter`` reads the file once, asks each family, and returns the loaded ``Adapter``.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


class AdapterFormatError(ValueError):
    """A file that no family accepts, or that one accepts but with missing / unexpected / mis-shaped keys."""


@dataclass
class Adapter:
    """A loaded adapter: ``family`` ('sdxl' | 'flux'), the ``format`` found, the module(s) and a report.

    ``module`` is the family's torch module; ``info`` holds what the loader found (subjects supported,
    token counts, widths) as plain values, shown to the user by ``summary()``.
    """

    family: str
    format: str
    module: Any
    info: dict[str, Any] = field(default_factory=dict)
    filename: str = ""

    def summary(self) -> str:
        lines = [f"{self.filename or 'adapter'}: {self.format} ({self.family.upper()})"]
        lines += [f"  {k}: {v}" for k, v in self.info.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class AdapterFamily:
    """One base-model family's formats: ``detect(sd) -> format name | None``, ``load(sd, format) -> Adapter``.

    ``formats`` maps each format name to the keys that identify it (for the error message of a file that
    matches no format).
    """

    name: str
    formats: Mapping[str, str]
    detect: Callable[[Mapping[str, torch.Tensor]], str | None]
    load: Callable[[Mapping[str, torch.Tensor], str], Adapter]


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        raise AdapterFormatError(f"unexpected {type(obj).__name__} at '{prefix or '<root>'}': adapter files hold "
                                 "tensors (a state dict, possibly nested as image_proj / ip_adapter)")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from .safetensors, or a .bin/.pt/.pth read with ``torch.load(weights_only=True)``.

    Nested dicts (``{"image_proj": {...}, "ip_adapter": {...}}``, the IP-Adapter / MS-Diffusion .bin files)
    become dotted keys (``image_proj.latents``, ``ip_adapter.1.to_k_ip.weight``), which is also how the
    flat safetensors conversions of those files name them.
    """
    name = os.path.basename(path)
    if path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise AdapterFormatError(f"{name} is not a readable .safetensors file ({_first_line(e)}); it may be "
                                     "truncated or still downloading: download it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message ends with advice to load with weights_only=False, which would run the file's code
        raise AdapterFormatError(f"{name} is not a plain tensor file: it holds Python objects that would run code "
                                 "when loaded, so it is refused for safety; use the .safetensors version of the "
                                 "file") from None
    except Exception as e:  # noqa: BLE001  torch.load raises many types (zip, EOF, runtime); none runs code
        raise AdapterFormatError(f"{name} could not be read as a tensor file ({_first_line(e)}); it may be "
                                 "truncated or not a weight file: download it again") from None
    out: dict[str, torch.Tensor] = {}
    try:
        _flatten(obj, "", out)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{name}: {e}") from None
    return out


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of a library error, shortened: enough to tell the cause, never a wall of text."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_summary(sd: Mapping[str, torch.Tensor], limit: int = 8) -> str:
    """The top-level key prefixes of a state dict with counts, for error messages."""
    counts: dict[str, int] = {}
    for k in sd:
        head = k.split(".", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{k}.* ({n})" for k, n in items) or "no keys"


def detect_and_load(sd: Mapping[str, torch.Tensor], families: list[AdapterFamily], filename: str = "") -> Adapter:
    """Ask every family; the first that recognises the file loads it. Otherwise name what was found."""
    for family in families:
        fmt = family.detect(sd)
        if fmt is not None:
            adapter = family.load(sd, fmt)
            adapter.filename = filename
            return adapter
    known = "; ".join(f"{fmt} ({keys})" for fam in families for fmt, keys in fam.formats.items())
    raise AdapterFormatError(f"not a known adapter format: found {key_summary(sd)}; accepted formats: "
                             f"{known or 'none registered'}")
