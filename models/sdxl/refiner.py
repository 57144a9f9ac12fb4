"""Progressive residual refinement of subject tokens (Sec. 3.2 of 000, Eqs. 1-4).

Axis legend: N subjects, M tokens per subject, C token width, h heads, d head width.

    T1 = T_base + alpha * s_1 * rho_1(LocalAttn_w(T_base + e_1))                  (Eq. 1, w = 4)
    T2 = T1 + alpha * s_2 * rho_2(SparseAttn_k(T1 + e_2 + Skip_1(T_base)))        (Eq. 2, k = 8)
    T3 = T2 + alpha * s_3 * rho_3(SparseAttn_k(T2 + e_3 + Skip_2(T_base)))        (Eq. 3, k = 4)
    rho_l(x) = Linear_2(Tanh(Linear_1(LayerNorm(x))))                             (Eq. 4)

Output ``[T_base; T1; T2; T3]`` as [N, 4, M, C]. Attention runs inside each subject's M tokens.
Local windows are the non-overlapping blocks of ``w`` consecutive tokens (token i sees j iff i // w == j // w);
sparse attention keeps, per query and head, the k largest scores (ties broken by lower index) before the softmax.

Checkpoint names (under ``refiner.`` in an R^3 file): ``levels.{l}.pos`` [1, M, C] (e_{l+1}),
``levels.{l}.attn.{to_q,to_k,to_v}.weight`` [C, C], ``levels.{l}.attn.to_out.weight/bias``,
``levels.{l}.rho.{0,1,3}.*`` (LayerNorm, Linear_1, Linear_2; 2 is the Tanh), ``levels.{l}.scale`` [] (s_{l+1}),
``levels.{1,2}.skip.weight/bias`` (Skip_1, Skip_2), and the sizes as buffers: ``alpha`` [], ``heads`` [],
``window`` [], ``topk`` [2].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

INIT_SCALE = 0.1  # s_l at initialisation (Sec. 3.2.1 of 000)


@dataclass(frozen=True)
class RefinerConfig:
    """Token width C, tokens per subject M, heads, window w (Eq. 1), top-k of levels 2 and 3 (Eqs. 2-3)."""

    dim: int = 2048
    tokens: int = 16
    heads: int = 32
    window: int = 4
    topk: tuple[int, int] = (8, 4)


# --------------------------------------------------------------------------- masks


def window_mask(tokens: int, window: int, device=None) -> torch.Tensor:
    """Eq. 1 of 000: bool [M, M], True where key j lies in query i's window (same block of ``window``)."""
    idx = torch.arange(tokens, device=device) // window
    return idx[:, None] == idx[None, :]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Eqs. 2-3 of 000: bool mask of the ``k`` largest scores along the last axis (all of them if k >= M)."""
    k = min(k, scores.shape[-1])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter(-1, scores.topk(k, dim=-1, sorted=False).indices, True)


# --------------------------------------------------------------------------- modules


class LevelAttention(nn.Module):
    """Multi-head self-attention over one subject's tokens restricted by a window or a top-k mask."""

    def __init__(self, dim: int, heads: int, *, operations=nn, dtype=None, device=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"refiner width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_out = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, *, window: int | None = None, topk: int | None = None) -> torch.Tensor:
        n, m, _ = x.shape
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [N, h, M, M]
        keep = window_mask(m, window, x.device) if window is not None else topk_mask(scores, topk)
        weights = scores.masked_fill(~keep, float("-inf")).softmax(-1).to(v.dtype)
        return self.to_out((weights @ v).transpose(1, 2).reshape(n, m, -1))


def residual_projection(dim: int, *, operations=nn, dtype=None, device=None) -> nn.Sequential:
    """Eq. 4 of 000: rho = Linear_2(Tanh(Linear_1(LayerNorm(x)))), keys ``0``, ``1``, ``3``."""
    return nn.Sequential(
        operations.LayerNorm(dim, dtype=dtype, device=device),
        operations.Linear(dim, dim, dtype=dtype, device=device),
        nn.Tanh(),
        operations.Linear(dim, dim, dtype=dtype, device=device),
    )


class RefinementLevel(nn.Module):
    """One level l of Eqs. 1-3: positional embedding e_l, masked attention, rho_l, scale s_l, optional Skip."""

    def __init__(self, config: RefinerConfig, skip: bool, *, operations=nn, dtype=None, device=None):
        super().__init__()
        c = config
        self.pos = nn.Parameter(torch.randn(1, c.tokens, c.dim, dtype=dtype, device=device) * 0.02)
        self.attn = LevelAttention(c.dim, c.heads, operations=operations, dtype=dtype, device=device)
        self.rho = residual_projection(c.dim, operations=operations, dtype=dtype, device=device)
        self.scale = nn.Parameter(torch.tensor(INIT_SCALE, dtype=dtype, device=device))
        self.skip = operations.Linear(c.dim, c.dim, dtype=dtype, device=device) if skip else None

    def correction(self, prev: torch.Tensor, base: torch.Tensor, alpha: float, **mask) -> torch.Tensor:
        """``alpha * s_l * rho_l(Attn(prev + e_l [+ Skip(T_base)]))``, the bounded residual of one level."""
        x = prev + self.pos.to(prev)
        if self.skip is not None:
            x = x + self.skip(base)
        return alpha * self.scale.to(prev) * self.rho(self.attn(x, **mask))


class ProgressiveRefiner(nn.Module):
    """Eqs. 1-4 of 000: T_base [N, M, C] -> [T_base; T1; T2; T3] as [N, 4, M, C]."""

    def __init__(self, config: RefinerConfig, alpha: float = 1.0, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.levels = nn.ModuleList(RefinementLevel(config, skip=l > 0, operations=operations, dtype=dtype, device=device)
                                    for l in range(3))
        # the sizes travel with the weights, so a file alone rebuilds the module
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("heads", torch.tensor(config.heads))
        self.register_buffer("window", torch.tensor(config.window))
        self.register_buffer("topk", torch.tensor(config.topk))

    def forward(self, base: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """``alpha`` overrides the warmup coefficient stored with the weights (0 = identity on T_base)."""
        c = self.config
        if base.ndim != 3 or base.shape[1:] != (c.tokens, c.dim):
            raise ValueError(f"the refiner expects tokens [N, {c.tokens}, {c.dim}], got {tuple(base.shape)}")
        a = float(self.alpha) if alpha is None else float(alpha)
        l1, l2, l3 = self.levels
        t1 = base + l1.correction(base, base, a, window=c.window)  # Eq. 1
        t2 = t1 + l2.correction(t1, base, a, topk=c.topk[0])  # Eq. 2
        t3 = t2 + l3.correction(t2, base, a, topk=c.topk[1])  # Eq. 3
        return torch.stack((base, t1, t2, t3), dim=1)
