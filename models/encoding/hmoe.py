"""HMoE feature fusion of hierarchical CLIP features (Sec. 4.2 of 004, DynaIP, Eqs. 6-8).

Axis legend: B subjects (batch), L levels (low, mid, high), G tokens (CLS + patches), D encoder
width, E expert width.

Checkpoint key layout (safetensors, what the training toolkit saves; see the README):

    experts.{l}.0.weight [E, D]   experts.{l}.0.bias [E]     Linear        (l = 0 low, 1 mid, 2 high)
    experts.{l}.2.weight [E]      experts.{l}.2.bias [E]     LayerNorm     (index 1 is the GELU)
    router.0.weight [H, L*D]      router.0.bias [H]          Linear on the concatenated CLS tokens
    router.2.weight [L, H]        router.2.bias [L]          Linear to one logit per level (1 is Tanh)

Header metadata: ``format = "troupe.hmoe"``, ``version = "1"``, optionally ``layers`` ("10,17,24").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

LEVELS = ("low", "mid", "high")
FORMAT_NAME = "troupe.hmoe"
FORMAT_VERSION = "1"


class FusionCheckpointError(ValueError):
    """A fusion checkpoint that does not fit: the message names the keys and shapes."""


@dataclass(frozen=True)
class HMoEConfig:
    """Sizes of an HMoE module: encoder width D, expert width E, router hidden width H, levels L."""

    in_dim: int
    out_dim: int
    router_hidden: int = 256
    num_levels: int = 3


@dataclass(frozen=True)
class FusionResult:
    """Fused tokens [B, G, E], the router's weights [B, L] and the weights used [B, L]."""

    fused: torch.Tensor
    routed_weights: torch.Tensor
    weights: torch.Tensor


def expert(in_dim: int, out_dim: int, operations=nn, dtype=None, device=None) -> nn.Sequential:
    """Eq. 6 of 004: one level's expert, Linear -> GELU -> LayerNorm over the full tokens."""
    return nn.Sequential(
        operations.Linear(in_dim, out_dim, dtype=dtype, device=device),
        nn.GELU(),
        operations.LayerNorm(out_dim, dtype=dtype, device=device),
    )


class HMoE(nn.Module):
    """Eqs. 6-8 of 004: per-level experts, one router on all levels' CLS tokens, and their weighted sum.

    Deviation from Eq. 7 (``w_l = Route_l(Phi_l^CLS)``, a router per level): one MLP reads the three CLS tokens
    concatenated, a superset of per-level routers (it can learn them, and also compare levels before choosing);
    the key layout ``router.{0,2}`` is what the training toolkit saves.
    """

    def __init__(self, config: HMoEConfig, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            expert(config.in_dim, config.out_dim, operations, dtype, device) for _ in range(config.num_levels)
        )
        self.router = nn.Sequential(
            operations.Linear(config.num_levels * config.in_dim, config.router_hidden, dtype=dtype, device=device),
            nn.Tanh(),
            operations.Linear(config.router_hidden, config.num_levels, dtype=dtype, device=device),
        )

    def route(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        """Eq. 7 of 004: fusion weights [B, L] (softmax, sum to 1) from the CLS tokens [B, L, D]."""
        logits = self.router(cls_tokens.flatten(1))
        return torch.softmax(logits.float(), dim=-1).to(cls_tokens.dtype)

    def experts_out(self, full_tokens: torch.Tensor) -> torch.Tensor:
        """Eq. 6 of 004: expert outputs [B, L, G, E] of the full tokens [B, L, G, D]."""
        return torch.stack([e(full_tokens[:, i]) for i, e in enumerate(self.experts)], dim=1)

    def forward(self, hidden: torch.Tensor, override: torch.Tensor | None = None,
                summary: torch.Tensor | None = None, dropped: torch.Tensor | None = None) -> FusionResult:
        """Eq. 8 of 004: ``sum_l w_l * e_l``; ``override`` [B or 1, L] replaces the routed weights (B.4);
        ``summary`` [B, L, D] replaces token 0 as the router's input (SigLIP has no CLS token: its pooled output);
        ``dropped`` [B, L] (bool, training only: DynaIP's expert dropout) zeroes those experts' features e_l."""
        if hidden.ndim != 4 or hidden.shape[1] != self.config.num_levels:
            raise ValueError(f"expected hierarchical features [B, {self.config.num_levels}, G, D], "
                             f"got {tuple(hidden.shape)}")
        routed = self.route(hidden[:, :, 0] if summary is None else summary.to(hidden))
        weights = routed if override is None else normalise_weights(override).to(routed).expand_as(routed)
        experts = self.experts_out(hidden)
        if dropped is not None:
            experts = experts * (~dropped.to(experts.device, torch.bool)).to(experts.dtype)[:, :, None, None]
        fused = torch.einsum("bl,blgd->bgd", weights, experts)
        return FusionResult(fused=fused, routed_weights=routed, weights=weights)


def normalise_weights(weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """User weights [.., L] made non-negative and summing to 1 (B.4 of 004: granularity control)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim == 1:
        w = w[None]
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"fusion weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError(f"fusion weights must not all be 0, got {w.tolist()}")
    return w / total


# --------------------------------------------------------------------------- checkpoints


def expected_shapes(config: HMoEConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the checkpoint layout with its shape for this config."""
    d, e, h, n = config.in_dim, config.out_dim, config.router_hidden, config.num_levels
    shapes: dict[str, tuple[int, ...]] = {}
    for l in range(n):
        shapes |= {f"experts.{l}.0.weight": (e, d), f"experts.{l}.0.bias": (e,),
                   f"experts.{l}.2.weight": (e,), f"experts.{l}.2.bias": (e,)}
    shapes |= {"router.0.weight": (h, n * d), "router.0.bias": (h,), "router.2.weight": (n, h), "router.2.bias": (n,)}
    return shapes


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> HMoEConfig:
    """Read the sizes off a checkpoint, naming what is missing when it is not an HMoE file."""
    needed = ("experts.0.0.weight", "router.0.weight", "router.2.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:6]) or "no keys"
        raise FusionCheckpointError(
            f"not an HMoE fusion checkpoint: missing keys {', '.join(missing)} (found {sample}...)"
        )
    out_dim, in_dim = sd["experts.0.0.weight"].shape
    num_levels, hidden = sd["router.2.weight"].shape
    return HMoEConfig(in_dim=int(in_dim), out_dim=int(out_dim), router_hidden=int(hidden), num_levels=int(num_levels))


def check_state_dict(sd: Mapping[str, torch.Tensor], config: HMoEConfig) -> None:
    """Raise naming every missing, unexpected or mis-shaped key."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in sorted(want) if k in sd
             and tuple(sd[k].shape) != want[k]]
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes: {'; '.join(wrong)}")
    if parts:
        raise FusionCheckpointError("HMoE checkpoint does not match its layout: " + " | ".join(parts))


def hmoe_from_state_dict(sd: Mapping[str, torch.Tensor], encoder_width: int | None = None, **kw) -> HMoE:
    """Build and load an HMoE from a checkpoint; ``encoder_width`` checks it fits the CLIP encoder."""
    config = config_from_state_dict(sd)
    check_state_dict(sd, config)
    if encoder_width is not None and config.in_dim != encoder_width:
        keys = [f"experts.{l}.0.weight {tuple(sd[f'experts.{l}.0.weight'].shape)}" for l in range(config.num_levels)]
        keys.append(f"router.0.weight {tuple(sd['router.0.weight'].shape)}")
        raise FusionCheckpointError(
            f"the fusion checkpoint expects encoder width {config.in_dim} but the CLIP vision model has width "
            f"{encoder_width}: {', '.join(keys)} need input width {encoder_width} "
            f"(router.0.weight [H, {config.num_levels * encoder_width}]); pick the fusion file trained for this encoder"
        )
    module = HMoE(config, **kw)
    module.load_state_dict(dict(sd), strict=True)
    return module.eval()


def hmoe_metadata(layers: Sequence[int] | None = None) -> dict[str, str]:
    """The safetensors header metadata the toolkit writes with an HMoE checkpoint."""
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    if layers is not None:
        meta["layers"] = ",".join(str(int(x)) for x in layers)
    return meta
