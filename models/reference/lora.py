"""Reference-token LoRA: MOSAIC's published PEFT layout and Troupe's own, mapped onto ComfyUI's FLUX modules.

The LoRA acts on the reference tokens only (MOSAIC, 003; AlignGen Fig. 4, 002): the text and noisy-image
tokens always run the base weights. A LoRA is held as *parts*: each part adds ``scale * up @ down @ x`` to a
slice of output rows ``[offset, offset + rows)`` of one ComfyUI module, so diffusers' separate ``to_q`` /
``to_k`` / ``to_v`` / ``proj_mlp`` land on the right rows of ComfyUI's fused ``qkv`` and ``linear1``.

Layouts (README, "FLUX reference branch"):
- ``mosaic``: ``transformer.<diffusers module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
  (``FluxPipeline.save_lora_weights`` of a PEFT adapter; alpha = rank, so scale 1) on ``x_embedder``;
  ``transformer_blocks.N.{norm1.linear, attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, ff.net.2}``;
  ``single_transformer_blocks.N.{norm.linear, attn.to_q, attn.to_k, attn.to_v, proj_mlp, proj_out}``.
- ``troupe``: ``<ComfyUI module>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r], optional
  ``.alpha`` (scalar; scale = alpha / r, 1 when absent) on any of ``img_in``,
  ``double_blocks.N.{img_mod.lin, img_attn.qkv, img_attn.proj, img_mlp.0, img_mlp.2}``,
  ``single_blocks.N.{modulation.lin, linear1, linear2}``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..adapter_file import AdapterFormatError


@dataclass(frozen=True)
class FluxDims:
    """The widths and depths of a FLUX DiT that a LoRA must fit (hidden, MLP hidden, patchified input)."""

    hidden: int
    mlp_hidden: int
    in_channels: int
    depth: int
    depth_single: int

    @classmethod
    def from_model(cls, dit) -> FluxDims:
        """Read the dims off a ComfyUI ``Flux`` diffusion model (``model.model.diffusion_model``)."""
        p = dit.params
        return cls(hidden=p.hidden_size, mlp_hidden=int(p.hidden_size * p.mlp_ratio),
                   in_channels=p.in_channels * p.patch_size * p.patch_size, depth=p.depth,
                   depth_single=p.depth_single_blocks)


@dataclass(frozen=True)
class LoRAPart:
    """``y[..., offset:offset+rows] += scale * (x @ down.T) @ up.T`` for one target module."""

    offset: int
    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0


@dataclass
class ReferenceLoRA:
    """LoRA parts per ComfyUI module name (``double_blocks.0.img_attn.qkv``, ``img_in``, ...)."""

    parts: dict[str, tuple[LoRAPart, ...]]
    format: str
    rank: int
    source_keys: int = 0
    _moved: dict = field(default_factory=dict, repr=False, compare=False)

    def modules(self) -> list[str]:
        return sorted(self.parts)

    def to(self, device, dtype) -> ReferenceLoRA:
        """A copy on ``device``/``dtype``, cached so a run moves the weights once."""
        key = (str(device), dtype)
        if key not in self._moved:
            parts = {n: tuple(LoRAPart(p.offset, p.down.to(device, dtype), p.up.to(device, dtype), p.scale)
                              for p in ps) for n, ps in self.parts.items()}
            self._moved[key] = ReferenceLoRA(parts, self.format, self.rank, self.source_keys)
        return self._moved[key]

    def apply(self, name: str, x: torch.Tensor, y: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``y`` (the base module's output for ``x``) plus this LoRA's delta for module ``name``."""
        parts = self.parts.get(name)
        if not parts or strength == 0.0:
            return y
        y = y.clone()
        for p in parts:
            delta = (x @ p.down.T) @ p.up.T
            y[..., p.offset:p.offset + p.up.shape[0]] += (strength * p.scale) * delta
        return y

    def summary(self) -> str:
        return f"{self.format} LoRA, rank {self.rank}, {len(self.parts)} modules ({self.source_keys} keys)"


# --------------------------------------------------------------------------- MOSAIC (diffusers PEFT) layout

MOSAIC_DOUBLE = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")
MOSAIC_SINGLE = ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def mosaic_targets(d: FluxDims) -> dict[str, tuple[str, int, int, int]]:
    """diffusers module -> (ComfyUI module, row offset, rows, in features) for MOSAIC's target modules."""
    h, m = d.hidden, d.mlp_hidden
    out: dict[str, tuple[str, int, int, int]] = {"x_embedder": ("img_in", 0, h, d.in_channels)}
    for i in range(d.depth):
        s, c = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[s + "norm1.linear"] = (c + "img_mod.lin", 0, 6 * h, h)
        out[s + "attn.to_q"] = (c + "img_attn.qkv", 0, h, h)
        out[s + "attn.to_k"] = (c + "img_attn.qkv", h, h, h)
        out[s + "attn.to_v"] = (c + "img_attn.qkv", 2 * h, h, h)
        out[s + "attn.to_out.0"] = (c + "img_attn.proj", 0, h, h)
        out[s + "ff.net.2"] = (c + "img_mlp.2", 0, h, m)
    for i in range(d.depth_single):
        s, c = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out[s + "norm.linear"] = (c + "modulation.lin", 0, 3 * h, h)
        out[s + "attn.to_q"] = (c + "linear1", 0, h, h)
        out[s + "attn.to_k"] = (c + "linear1", h, h, h)
        out[s + "attn.to_v"] = (c + "linear1", 2 * h, h, h)
        out[s + "proj_mlp"] = (c + "linear1", 3 * h, m, h)
        out[s + "proj_out"] = (c + "linear2", 0, h, h + m)
    return out


def troupe_targets(d: FluxDims) -> dict[str, tuple[str, int, int, int]]:
    """Troupe's own layout: ComfyUI module -> (itself, 0, out features, in features)."""
    h, m = d.hidden, d.mlp_hidden
    out = {"img_in": (h, d.in_channels)}
    for i in range(d.depth):
        c = f"double_blocks.{i}."
        out.update({c + "img_mod.lin": (6 * h, h), c + "img_attn.qkv": (3 * h, h), c + "img_attn.proj": (h, h),
                    c + "img_mlp.0": (m, h), c + "img_mlp.2": (h, m)})
    for i in range(d.depth_single):
        c = f"single_blocks.{i}."
        out.update({c + "modulation.lin": (3 * h, h), c + "linear1": (3 * h + m, h), c + "linear2": (h, h + m)})
    return {k: (k, 0, rows, fin) for k, (rows, fin) in out.items()}


_MOSAIC_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")
_TROUPE_KEY = re.compile(r"^(.+)\.(lora_down|lora_up)\.weight$|^(.+)\.alpha$")


def detect_format(sd: Mapping[str, torch.Tensor]) -> str | None:
    """'mosaic' (PEFT lora_A/lora_B on diffusers names), 'troupe' (lora_down/lora_up on ComfyUI names) or None."""
    keys = list(sd)
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "mosaic"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "troupe"
    return None


def _names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_reference_lora(sd: Mapping[str, torch.Tensor], dims: FluxDims, fmt: str | None = None) -> ReferenceLoRA:
    """Check a LoRA state dict against the model's dims and map it onto ComfyUI module names."""
    fmt = fmt or detect_format(sd)
    if fmt == "mosaic":
        return _load_mosaic(sd, dims)
    if fmt == "troupe":
        return _load_troupe(sd, dims)
    raise AdapterFormatError("not a reference LoRA: expected MOSAIC's PEFT keys "
                             "'transformer.<module>.lora_A.weight' / '.lora_B.weight' or Troupe's "
                             f"'<module>.lora_down.weight' / '.lora_up.weight'; found {_names(sd)}")


def _pair_part(name: str, down: torch.Tensor, up: torch.Tensor, rows: int, fin: int, scale: float,
               offset: int) -> LoRAPart:
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise AdapterFormatError(f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair "
                                 "(need down [r, in] and up [out, r])")
    if down.shape[1] != fin or up.shape[0] != rows:
        raise AdapterFormatError(f"{name}: shapes down {tuple(down.shape)}, up {tuple(up.shape)} do not fit this "
                                 f"model (need down [r, {fin}], up [{rows}, r]): the LoRA is for another FLUX size")
    return LoRAPart(offset, down, up, scale)  # kept as stored (bf16 for MOSAIC); moved and cast once per run


def _load_mosaic(sd: Mapping[str, torch.Tensor], dims: FluxDims) -> ReferenceLoRA:
    targets = mosaic_targets(dims)
    found: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for k, v in sd.items():
        m = _MOSAIC_KEY.match(k)
        if m is None or m.group(1) not in targets:
            unexpected.append(k)
            continue
        found.setdefault(m.group(1), {})[m.group(2)] = v
    expected = {f"transformer.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    present = {f"transformer.{t}.lora_{ab}.weight" for t, d in found.items() for ab in d}
    missing = expected - present
    if unexpected or missing:
        raise AdapterFormatError(
            "MOSAIC-layout LoRA does not fit this FLUX model"
            + (f"; missing keys: {_names(missing)}" if missing else "")
            + (f"; unexpected keys: {_names(unexpected)}" if unexpected else "")
            + f" (model: {dims.depth} double + {dims.depth_single} single blocks, hidden {dims.hidden})")
    parts: dict[str, list[LoRAPart]] = {}
    for t, (module, offset, rows, fin) in targets.items():
        part = _pair_part(f"transformer.{t}", found[t]["A"], found[t]["B"], rows, fin, 1.0, offset)
        parts.setdefault(module, []).append(part)
    rank = int(next(iter(found.values()))["A"].shape[0])
    return ReferenceLoRA({k: tuple(v) for k, v in parts.items()}, "mosaic", rank, len(sd))


def _load_troupe(sd: Mapping[str, torch.Tensor], dims: FluxDims) -> ReferenceLoRA:
    targets = troupe_targets(dims)
    found: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for k, v in sd.items():
        m = _TROUPE_KEY.match(k)
        name = (m.group(1) or m.group(3)) if m else None
        if name not in targets:
            unexpected.append(k)
            continue
        found.setdefault(name, {})["alpha" if m.group(3) else m.group(2)] = v
    missing = [f"{n}.{w}.weight" for n, d in found.items() for w in ("lora_down", "lora_up") if w not in d]
    if unexpected or missing or not found:
        raise AdapterFormatError(
            "Troupe-layout reference LoRA does not fit this FLUX model"
            + (f"; missing keys: {_names(missing)}" if missing else "")
            + (f"; unexpected keys: {_names(unexpected)}" if unexpected else "")
            + ("; no LoRA modules found" if not found else ""))
    parts = {}
    rank = 0
    for name, d in found.items():
        module, offset, rows, fin = targets[name]
        r = int(d["lora_down"].shape[0])
        scale = float(d["alpha"].float().reshape(-1)[0]) / r if "alpha" in d else 1.0
        parts[module] = (_pair_part(name, d["lora_down"], d["lora_up"], rows, fin, scale, offset),)
        rank = max(rank, r)
    return ReferenceLoRA(parts, "troupe", rank, len(sd))
