"""FLUX multi-subject adapter: image projection and one image cross-attention layer per MM-DiT block (004, DynaIP).

Axis legend: N subjects, G encoder tokens, T reference tokens after the projection, C their width (the K/V
input), D the DiT width (FLUX.1: 3072), H heads, d = D / H the head width (FLUX.1: 128).

Formats (detected from the keys; see the README, "FLUX adapter"):

``troupe-flux`` (ours, what the training toolkit saves; safetensors)::

    image_proj.proj.weight [D, E]   image_proj.proj.bias [D]     Linear per token, encoder width E -> D
    image_proj.norm.weight [D]      image_proj.norm.bias [D]     LayerNorm
    double_blocks.{i}.to_k_ip.weight [D, D]   double_blocks.{i}.to_v_ip.weight [D, D]   (no bias)
    double_blocks.{i}.norm_k.scale [d]                            per-head RMSNorm on K (FLUX's key norm)
    single_blocks.{j}.to_k_ip.weight / to_v_ip.weight / norm_k.scale   the same for every single block

``instantx-flux`` (InstantX FLUX.1-dev IP-Adapter, a pickle of ``image_proj`` and ``ip_adapter``)::

    image_proj.proj.0.weight [2P, P] / .bias   image_proj.proj.2.weight [T*C, 2P] / .bias   image_proj.norm [C]
    ip_adapter.{n}.to_k_ip.weight [D, C]   ip_adapter.{n}.to_v_ip.weight [D, C]   (n < #double: double block n,
                                                                                    else single block n - #double)

with P the pooled SigLIP width (1152), T = 128 tokens, C = 4096, and per-head RMSNorm (eps 1e-5, no affine)
on both K and V; the result is added to the block's attention output.

``xlabs-flux`` (XLabs FLUX IP-Adapter, double blocks only, safetensors)::

    ip_adapter_proj_model.proj.weight [T*C, P] / .bias   ip_adapter_proj_model.norm.weight / .bias [C]
    double_blocks.{i}.processor.ip_adapter_double_stream_k_proj.weight [D, C] / .bias [D]   (and ..._v_proj)

with P the projected CLIP ViT-L/14 image embedding (768), T = 4, C = 4096, no K/V normalisation, and the
result added to the block's image output (after its MLP), not to the attention output.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_file import Adapter, AdapterFamily, AdapterFormatError

TROUPE = "troupe-flux"
INSTANTX = "instantx-flux"
XLABS = "xlabs-flux"
ATTENTION, RESIDUAL = "attention", "residual"  # where the injection is added in a block
# the reference crop each format was trained with (clip_features.CROPS): DynaIP's own files pad; InstantX's
# SigLIP processor resizes to 384 x 384; XLabs uses CLIPImageProcessor (short side, centre crop)
TRAINED_CROP = {"troupe-flux": "pad", "instantx-flux": "stretch", "xlabs-flux": "centre crop"}
FORMATS = {
    TROUPE: "image_proj.proj.weight, double_blocks.{i}.to_k_ip.weight, single_blocks.{j}.to_k_ip.weight",
    INSTANTX: "image_proj.proj.0.weight, image_proj.proj.2.weight, ip_adapter.{0..n}.to_k_ip.weight",
    XLABS: "ip_adapter_proj_model.proj.weight, double_blocks.{i}.processor.ip_adapter_double_stream_k_proj.weight",
}


@dataclass(frozen=True)
class FluxAdapterConfig:
    """Sizes of a FLUX adapter; ``head_dim`` 0 means "the model's" (InstantX files do not store it)."""

    format: str
    encoder_dim: int
    context_dim: int
    hidden_size: int
    double_blocks: int  # -1: not stored (InstantX: all layers counted in single_blocks, split by the model)
    single_blocks: int
    head_dim: int = 0
    num_tokens: int = 0  # 0: one reference token per encoder token (troupe-flux)
    norm_v: bool = False
    norm_eps: float = 1e-6
    norm_affine: bool = True
    norm_k: bool = True
    kv_bias: bool = False
    inject: str = ATTENTION  # add to the attention output (troupe, InstantX) or to the block's image output (XLabs)
    pooled_mlp: bool = True  # InstantX: MLP P -> 2P -> T*C; XLabs: one Linear P -> T*C

    @property
    def double_only(self) -> bool:
        """Layers for the double blocks only (XLabs)."""
        return self.format == XLABS


# --------------------------------------------------------------------------- layers


class TokenProjection(nn.Module):
    """troupe-flux image projection: Linear + LayerNorm on every encoder token, [N, G, E] -> [N, G, D]."""

    def __init__(self, encoder_dim: int, hidden_size: int, *, dtype=None, device=None, operations=nn) -> None:
        super().__init__()
        self.proj = operations.Linear(encoder_dim, hidden_size, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(hidden_size, dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(tokens))


class PooledProjection(nn.Module):
    """Pooled [N, P] -> [N, T, C] -> LayerNorm: InstantX's MLP (P -> 2P -> T*C) or XLabs' single Linear."""

    def __init__(self, pooled_dim: int, context_dim: int, num_tokens: int, *, mlp: bool = True, dtype=None,
                 device=None, operations=nn) -> None:
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        if mlp:
            self.proj = nn.Sequential(operations.Linear(pooled_dim, pooled_dim * 2, dtype=dtype, device=device), nn.GELU(),
                                      operations.Linear(pooled_dim * 2, context_dim * num_tokens, dtype=dtype, device=device))
        else:
            self.proj = operations.Linear(pooled_dim, context_dim * num_tokens, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(context_dim, dtype=dtype, device=device)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pooled).reshape(-1, self.num_tokens, self.context_dim))


def rms_norm(x: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis (per head), optionally with a learned scale."""
    out = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    return out if scale is None else out * scale.to(out)


class ImageCrossAttention(nn.Module):
    """The new K/V of one block: Eq. 2 of 004, K_C and V_C projected from the reference tokens C."""

    def __init__(self, context_dim: int, hidden_size: int, head_dim: int, *, affine: bool, bias: bool = False,
                 dtype=None, device=None, operations=nn) -> None:
        super().__init__()
        self.to_k_ip = operations.Linear(context_dim, hidden_size, bias=bias, dtype=dtype, device=device)
        self.to_v_ip = operations.Linear(context_dim, hidden_size, bias=bias, dtype=dtype, device=device)
        self.norm_k = RMSScale(head_dim, dtype=dtype, device=device) if affine else None

    def kv(self, tokens: torch.Tensor, head_dim: int, *, norm_v: bool, eps: float, norm_k: bool = True,
           device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [N, H, T, d] of tokens [N, T, C], computed on ``device`` in ``dtype`` (weights cast there)."""
        device = device or tokens.device
        dtype = dtype or tokens.dtype
        c = tokens.to(device=device, dtype=dtype)
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        k = F.linear(c, cast(self.to_k_ip.weight), cast(self.to_k_ip.bias))
        v = F.linear(c, cast(self.to_v_ip.weight), cast(self.to_v_ip.bias))
        n, t, width = k.shape
        if width % head_dim:
            raise ValueError(f"adapter width {width} is not a multiple of the head width {head_dim}")
        k = k.view(n, t, width // head_dim, head_dim).transpose(1, 2)
        v = v.view(n, t, width // head_dim, head_dim).transpose(1, 2)
        if norm_k:
            k = rms_norm(k, None if self.norm_k is None else self.norm_k.scale, eps)
        if norm_v:
            v = rms_norm(v, None, eps)
        return k.contiguous(), v.contiguous()


class RMSScale(nn.Module):
    """The learned per-head scale of a key RMSNorm (checkpoint key ``norm_k.scale``)."""

    def __init__(self, dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))


class FluxImageAdapter(nn.Module):
    """Image projection plus one ImageCrossAttention per double and per single block (57 for FLUX.1)."""

    def __init__(self, config: FluxAdapterConfig, *, dtype=None, device=None, operations=nn) -> None:
        super().__init__()
        self.config = config
        self.trained_crop = TRAINED_CROP[config.format]
        c = config
        if c.format in (INSTANTX, XLABS):
            self.image_proj = PooledProjection(c.encoder_dim, c.context_dim, c.num_tokens, mlp=c.pooled_mlp,
                                               dtype=dtype, device=device, operations=operations)
        else:
            self.image_proj = TokenProjection(c.encoder_dim, c.hidden_size, dtype=dtype, device=device, operations=operations)

        def layer() -> ImageCrossAttention:
            return ImageCrossAttention(c.context_dim, c.hidden_size, max(c.head_dim, 1), affine=c.norm_affine,
                                       bias=c.kv_bias, dtype=dtype, device=device, operations=operations)

        total = c.single_blocks + max(c.double_blocks, 0)

        # one flat list in block order: double blocks, then single blocks (InstantX's ip_adapter.{n} order)
        self.layers = nn.ModuleList([layer() for _ in range(total)])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, kind: str, index: int, model_double_blocks: int) -> ImageCrossAttention:
        """The layer of double block ``index`` or single block ``index`` of a model with that many double blocks."""
        return self.layers[index if kind == "double" else model_double_blocks + index]

    @torch.no_grad()
    def reference_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """The reference tokens C [N, T, C] of every subject: encoder tokens [N, G, E] or pooled [N, P]."""
        param = self.image_proj.norm.weight
        return self.image_proj(inputs.to(device=param.device, dtype=param.dtype)).float()


# --------------------------------------------------------------------------- formats


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def detect(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The FLUX format of a state dict, or None."""
    if "image_proj.proj.weight" in sd and any(k.startswith("double_blocks.") and ".to_k_ip." in k for k in sd):
        return TROUPE
    if ("ip_adapter.0.to_k_ip.weight" in sd and "image_proj.proj.0.weight" in sd
            and "image_proj.proj.2.weight" in sd):
        return INSTANTX
    if "ip_adapter_proj_model.proj.weight" in sd and any(".processor.ip_adapter_double_stream_" in k for k in sd):
        return XLABS
    return None


def _check_keys(sd: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], fmt: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {v})" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != v]
    if missing or unexpected or wrong:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                more = f" and {len(items) - 6} more" if len(items) > 6 else ""
                parts.append(f"{name}: {', '.join(items[:6])}{more}")
        raise AdapterFormatError(f"{fmt} adapter file does not fit its layout: " + "; ".join(parts))


def _shape(sd: Mapping[str, torch.Tensor], key: str, fmt: str) -> tuple[int, ...]:
    if key not in sd:
        raise AdapterFormatError(f"{fmt} adapter file does not fit its layout: missing keys: {key}")
    return tuple(sd[key].shape)


def troupe_config(sd: Mapping[str, torch.Tensor]) -> FluxAdapterConfig:
    hidden, enc = _shape(sd, "image_proj.proj.weight", TROUPE)
    doubles = _indices(sd, r"double_blocks\.(\d+)\.")
    singles = _indices(sd, r"single_blocks\.(\d+)\.")
    (head_dim,) = _shape(sd, "double_blocks.0.norm_k.scale", TROUPE)
    return FluxAdapterConfig(format=TROUPE, encoder_dim=enc, context_dim=hidden, hidden_size=hidden,
                             double_blocks=max(doubles) + 1, single_blocks=(max(singles) + 1) if singles else 0,
                             head_dim=head_dim, norm_v=False, norm_eps=1e-6, norm_affine=True)


def troupe_expected(c: FluxAdapterConfig) -> dict[str, tuple[int, ...]]:
    out = {"image_proj.proj.weight": (c.hidden_size, c.encoder_dim), "image_proj.proj.bias": (c.hidden_size,),
           "image_proj.norm.weight": (c.hidden_size,), "image_proj.norm.bias": (c.hidden_size,)}
    for kind, count in (("double_blocks", c.double_blocks), ("single_blocks", c.single_blocks)):
        for i in range(count):
            out[f"{kind}.{i}.to_k_ip.weight"] = (c.hidden_size, c.context_dim)
            out[f"{kind}.{i}.to_v_ip.weight"] = (c.hidden_size, c.context_dim)
            out[f"{kind}.{i}.norm_k.scale"] = (c.head_dim,)
    return out


def instantx_config(sd: Mapping[str, torch.Tensor]) -> FluxAdapterConfig:
    _hidden2, pooled = _shape(sd, "image_proj.proj.0.weight", INSTANTX)
    (context,) = _shape(sd, "image_proj.norm.weight", INSTANTX)
    out_features = _shape(sd, "image_proj.proj.2.weight", INSTANTX)[0]
    hidden, ctx = _shape(sd, "ip_adapter.0.to_k_ip.weight", INSTANTX)
    layers = _indices(sd, r"ip_adapter\.(\d+)\.")
    total = max(layers) + 1
    if out_features % context:
        raise AdapterFormatError(f"{INSTANTX}: image_proj.proj.2.weight has {out_features} outputs, not a multiple "
                                 f"of the token width {context} (image_proj.norm.weight)")
    return FluxAdapterConfig(format=INSTANTX, encoder_dim=pooled, context_dim=ctx, hidden_size=hidden,
                             double_blocks=-1, single_blocks=total,
                             head_dim=0, num_tokens=out_features // context, norm_v=True, norm_eps=1e-5,
                             norm_affine=False)


def instantx_expected(c: FluxAdapterConfig) -> dict[str, tuple[int, ...]]:
    p, t = c.encoder_dim, c.num_tokens
    out = {"image_proj.proj.0.weight": (2 * p, p), "image_proj.proj.0.bias": (2 * p,),
           "image_proj.proj.2.weight": (t * c.context_dim, 2 * p), "image_proj.proj.2.bias": (t * c.context_dim,),
           "image_proj.norm.weight": (c.context_dim,), "image_proj.norm.bias": (c.context_dim,)}
    for n in range(c.single_blocks):
        out[f"ip_adapter.{n}.to_k_ip.weight"] = (c.hidden_size, c.context_dim)
        out[f"ip_adapter.{n}.to_v_ip.weight"] = (c.hidden_size, c.context_dim)
    return out


def xlabs_config(sd: Mapping[str, torch.Tensor]) -> FluxAdapterConfig:
    out_features, pooled = _shape(sd, "ip_adapter_proj_model.proj.weight", XLABS)
    (context,) = _shape(sd, "ip_adapter_proj_model.norm.weight", XLABS)
    hidden, ctx = _shape(sd, "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight", XLABS)
    if out_features % context:
        raise AdapterFormatError(f"{XLABS}: ip_adapter_proj_model.proj.weight has {out_features} outputs, not a "
                                 f"multiple of the token width {context} (ip_adapter_proj_model.norm.weight)")
    doubles = _indices(sd, r"double_blocks\.(\d+)\.")
    return FluxAdapterConfig(format=XLABS, encoder_dim=pooled, context_dim=ctx, hidden_size=hidden,
                             double_blocks=max(doubles) + 1, single_blocks=0, head_dim=0,
                             num_tokens=out_features // context, norm_affine=False, norm_k=False, kv_bias=True,
                             inject=RESIDUAL, pooled_mlp=False)


def xlabs_expected(c: FluxAdapterConfig) -> dict[str, tuple[int, ...]]:
    out = {"ip_adapter_proj_model.proj.weight": (c.num_tokens * c.context_dim, c.encoder_dim),
           "ip_adapter_proj_model.proj.bias": (c.num_tokens * c.context_dim,),
           "ip_adapter_proj_model.norm.weight": (c.context_dim,), "ip_adapter_proj_model.norm.bias": (c.context_dim,)}
    for i in range(c.double_blocks):
        for kv in ("k", "v"):
            key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            out[f"{key}.weight"] = (c.hidden_size, c.context_dim)
            out[f"{key}.bias"] = (c.hidden_size,)
    return out


def module_keys(sd: Mapping[str, torch.Tensor], c: FluxAdapterConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> FluxImageAdapter names (``layers.{n}`` in block order, double blocks first)."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(.*)", k):
            out[f"layers.{m.group(1)}.to_{m.group(2)}_ip.{m.group(3)}"] = v
        elif k.startswith("ip_adapter_proj_model."):
            out["image_proj." + k[len("ip_adapter_proj_model."):]] = v
        elif (m := re.match(r"ip_adapter\.(\d+)\.(.*)", k)) or (m := re.match(r"double_blocks\.(\d+)\.(.*)", k)):
            out[f"layers.{m.group(1)}.{m.group(2)}"] = v
        elif m := re.match(r"single_blocks\.(\d+)\.(.*)", k):
            out[f"layers.{c.double_blocks + int(m.group(1))}.{m.group(2)}"] = v
        else:
            out[k] = v
    return out


def troupe_state_dict(adapter: FluxImageAdapter) -> dict[str, torch.Tensor]:
    """A ``troupe-flux`` adapter's weights under the file's key names (the inverse of ``module_keys``)."""
    c = adapter.config
    if c.format != TROUPE:
        raise ValueError(f"only {TROUPE} adapters are saved in the {TROUPE} layout, not {c.format}")
    out = {}
    for k, v in adapter.state_dict().items():
        if m := re.match(r"layers\.(\d+)\.(.*)", k):
            n = int(m.group(1))
            kind, i = ("double_blocks", n) if n < c.double_blocks else ("single_blocks", n - c.double_blocks)
            out[f"{kind}.{i}.{m.group(2)}"] = v
        else:
            out[k] = v
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_troupe_flux(path: str, adapter: FluxImageAdapter) -> None:
    """Write a ``troupe-flux`` safetensors file that ``TroupeLoadAdapter`` loads (the training toolkit's output)."""
    from safetensors.torch import save_file

    save_file(troupe_state_dict(adapter), str(path), metadata={"format": TROUPE})


def new_troupe_adapter(encoder_dim: int, hidden_size: int, head_dim: int, double_blocks: int,
                       single_blocks: int) -> FluxImageAdapter:
    """A fresh ``troupe-flux`` adapter (torch's default initialisation; the caller seeds the generator)."""
    config = FluxAdapterConfig(format=TROUPE, encoder_dim=encoder_dim, context_dim=hidden_size,
                               hidden_size=hidden_size, double_blocks=double_blocks, single_blocks=single_blocks,
                               head_dim=head_dim, norm_v=False, norm_eps=1e-6, norm_affine=True)
    return FluxImageAdapter(config)


def build(sd: Mapping[str, torch.Tensor], fmt: str) -> FluxImageAdapter:
    """Check every key and shape of a state dict in format ``fmt`` and build the adapter (weights kept as stored)."""
    if fmt == TROUPE:
        config = troupe_config(sd)
        _check_keys(sd, troupe_expected(config), fmt)
    elif fmt == INSTANTX:
        config = instantx_config(sd)
        _check_keys(sd, instantx_expected(config), fmt)
    elif fmt == XLABS:
        config = xlabs_config(sd)
        _check_keys(sd, xlabs_expected(config), fmt)
    else:
        raise AdapterFormatError(f"unknown FLUX adapter format {fmt!r}; known: {', '.join(FORMATS)}")
    dtype = next(iter(sd.values())).dtype
    with torch.device("meta"):
        module = FluxImageAdapter(config)
    module = module.to_empty(device="cpu").to(dtype)
    module.load_state_dict(module_keys(sd, config), strict=True)
    return module.eval().requires_grad_(False)


def load(sd: Mapping[str, torch.Tensor], fmt: str) -> Adapter:
    """AdapterFamily.load: the adapter and what was found, for TroupeLoadAdapter's report."""
    module = build(sd, fmt)
    c = module.config
    params = sum(p.numel() for p in module.parameters())
    info = {
        "blocks": (f"{c.single_blocks} image cross-attention layers (double blocks first; FLUX.1: 19 + 38)"
                   if fmt == INSTANTX else
                   f"{c.double_blocks} double-block image cross-attention layers (added to the image stream)"
                   if fmt == XLABS else
                   f"{c.double_blocks} double + {c.single_blocks} single image cross-attention layers"),
        "DiT width": c.hidden_size,
        "input": (f"pooled image embedding of width {c.encoder_dim} (SigLIP so400m: 1152)" if fmt == INSTANTX
                  else f"projected CLIP image embedding of width {c.encoder_dim} (ViT-L/14: 768)" if fmt == XLABS
                  else f"encoder tokens of width {c.encoder_dim} (fused HMoE tokens or a CLIP layer)"),
        "reference tokens": (f"{c.num_tokens} per subject, width {c.context_dim}" if fmt in (INSTANTX, XLABS)
                             else "one per encoder token"),
        "parameters": f"{params / 1e6:.2f} M ({next(module.parameters()).dtype})",
        "subjects": "any number (mask-guided, Eq. 9 of 004)",
    }
    return Adapter(family="flux", format=fmt, module=module, info=info)


FAMILY = AdapterFamily(name="flux", formats=FORMATS, detect=detect, load=load)
