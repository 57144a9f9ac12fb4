"""FLUX adapter maths: DDS modes, token masks and the masked image cross-attention of Eq. 9 of 004 (DynaIP).

Axis legend: B batch, N subjects, H heads, L rows (tokens) that receive the injection, T reference tokens,
d head width, D = H * d the DiT width, (h, w) the latent grid, (h', w') the image-token grid of 2x2 patches.

    X = X_MMA + sum_i lambda_i * M_i (.) CA(X, C_i),   CA(X, C) = softmax(Q_X K_C^T / sqrt(d)) V_C   (Eqs. 9, 2)

``masked_cross_attention`` computes the sum with the host's attention function (ComfyUI's
``optimized_attention``, so the user's backend runs it; ``sdpa_attention`` is the plain-torch default), on the
rows of each region only. Plain torch; the hooks that run it inside a FLUX block are in ``patch.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout.grid import token_grid
from ..layout.layout import Layout

AS_TRAINED = "as trained"
IMAGE_ONLY = "image branch only"
BOTH = "both branches"
# InstantX's injection (its ComfyUI port, IPAFluxAttnProcessor2_0): image tokens in double blocks, the whole joint
# stream (text tokens included) in single blocks
SINGLE_STREAM = "whole stream in single blocks (InstantX)"
DDS_MODES: tuple[str, ...] = (AS_TRAINED, IMAGE_ONLY, BOTH, SINGLE_STREAM)
TRAINED_DDS = {"troupe-flux": IMAGE_ONLY, "instantx-flux": SINGLE_STREAM, "xlabs-flux": IMAGE_ONLY}


def resolve_dds(mode: str, fmt: str) -> str:
    """The injection rule a mode means for a file format: ``as trained`` is the rule the format was made for
    (DynaIP's image-only inference rule for the pack's own files and XLabs, InstantX's for InstantX)."""
    return TRAINED_DDS.get(fmt, IMAGE_ONLY) if mode == AS_TRAINED else mode

AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class InjectionParams:
    """What the artist chose: global weight, per-subject weights, sigma window, DDS mode (Eqs. 4-5 of 004)."""

    weight: float = 1.0
    subject_weights: tuple[float, ...] = ()
    sigma_start: float = float("inf")  # sigma at start_percent (larger sigma = earlier)
    sigma_end: float = 0.0
    dds: str = IMAGE_ONLY  # resolved (resolve_dds): never AS_TRAINED here

    def __post_init__(self) -> None:
        if self.dds not in DDS_MODES or self.dds == AS_TRAINED:
            raise ValueError(f"branches must be one of {DDS_MODES}, got {self.dds!r}")


# --------------------------------------------------------------------------- masks


def token_masks(layout: Layout, latent_h: int, latent_w: int, patch: int = 2) -> torch.Tensor:
    """M_i of Eq. 9 at the token grid [N, h' * w']: each region rendered on the latent grid, averaged over
    the real (unpadded) latent pixels of every patch x patch token."""
    masks = layout.masks(latent_h, latent_w)  # [N, h, w]
    gh, gw = token_grid(latent_h, latent_w, patch)
    pad = (0, gw * patch - latent_w, 0, gh * patch - latent_h)
    valid = F.pad(torch.ones(1, 1, latent_h, latent_w), pad)
    summed = F.avg_pool2d(F.pad(masks[:, None], pad), patch, divisor_override=1)
    count = F.avg_pool2d(valid, patch, divisor_override=1)
    return (summed / count)[:, 0].flatten(1)


@dataclass(frozen=True)
class TokenMasks:
    """M_i [N, L] on the rows that receive the injection, with each subject's nonzero rows (None: all rows)."""

    values: torch.Tensor
    rows: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(cls, values: torch.Tensor) -> TokenMasks:
        rows = []
        for m in values:
            r = torch.nonzero(m > 0).flatten()
            rows.append(None if r.numel() == m.numel() else r)
        return cls(values, tuple(rows))


# --------------------------------------------------------------------------- Eq. 9


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None,
                   skip_reshape: bool = True, **_: object) -> torch.Tensor:
    """Plain-torch attention of q, k, v [B, H, L, d] -> [B, L, H*d], ComfyUI's ``skip_reshape`` layout (tests)."""
    if not skip_reshape:
        raise ValueError("this default takes [B, H, L, d] tensors (skip_reshape=True)")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], heads * q.shape[3])


def masked_cross_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                           lam: torch.Tensor, masks: TokenMasks | None, lam_device: torch.Tensor | None = None,
                           attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """sum_i lambda_i * M_i (.) CA(q, C_i) [B, L, D] (Eq. 9 of 004, CA of Eq. 2); rows outside M_i are skipped.

    q [B, H, L, d]; keys / values: one [H, T, d] per subject; lam [B, N] (CPU; ``lam_device``: the same on q's
    device, to avoid a copy per call); masks: M_i or None (all 1). M_i and lambda_i multiply the attention
    output, not the logits, so no mask goes into ``attention`` (any backend, fused kernels included).
    """
    if lam_device is None:
        lam_device = lam.to(device=q.device, dtype=q.dtype)
    b, h, n_rows, d = q.shape
    out = q.new_zeros(b, n_rows, h * d)
    for i, (k, v) in enumerate(zip(keys, values)):
        if not bool(lam[:, i].any()):
            continue
        scale = lam_device[:, i].view(b, 1, 1)
        rows, m = None, None
        if masks is not None:
            rows, m = masks.rows[i], masks.values[i]
            if rows is not None and rows.numel() == 0:
                continue
            m = (m if rows is None else m.index_select(0, rows)).view(1, -1, 1)
        qi = q if rows is None else q.index_select(2, rows)
        a = attention(qi, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), h, skip_reshape=True) * scale
        if m is not None:
            a = a * m.to(a.dtype)
        grad = a.requires_grad or out.requires_grad  # training: out of place, so autograd keeps every version
        if rows is None:
            out = out + a if grad else out.add_(a)
        else:
            out = out.index_add(1, rows, a.to(out.dtype)) if grad else out.index_add_(1, rows, a.to(out.dtype))
    return out


def unrope(q: torch.Tensor, pe: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of a RoPE-rotated query [B, H, L, d] turned back into the pre-RoPE query.

    ``pe`` [B or 1, 1, L, d/2, 2, 2] holds one 2x2 rotation per position and frequency (FLUX's RoPE); its
    inverse is the transpose. Without ``pe`` (no RoPE) the rows are returned as they are.
    """
    rows = q[:, :, start:start + count]
    if pe is None:
        return rows
    rot = pe[:, :, start:start + count].transpose(-1, -2)
    x = rows.to(rot.dtype).reshape(*rows.shape[:-1], -1, 1, 2)
    out = rot[..., 0] * x[..., 0] + rot[..., 1] * x[..., 1]
    return out.reshape(rows.shape).type_as(rows)
