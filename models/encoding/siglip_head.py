"""SigLIP's attention-pooling head (SigLIP, Zhai et al. 2023): the pooled output InstantX's adapter reads.

ComfyUI loads SigLIP vision models without this head, so its ``image_embeds`` are the post-layernorm tokens.
The published SigLIP vision checkpoints keep the head under the transformers names::

    vision_model.head.probe                        [1, 1, D]   the learned query
    vision_model.head.attention.in_proj_weight     [3D, D]     nn.MultiheadAttention (batch first)
    vision_model.head.attention.in_proj_bias       [3D]
    vision_model.head.attention.out_proj.weight    [D, D]      / .bias [D]
    vision_model.head.layernorm.weight / .bias     [D]         LayerNorm (eps 1e-6)
    vision_model.head.mlp.fc1.weight / .bias       [I, D]      MLP with tanh-approximated GELU
    vision_model.head.mlp.fc2.weight / .bias       [D, I]

``pooled = x + MLP(LN(x))`` with ``x = MHA(probe, tokens, tokens)``, as transformers'
``SiglipMultiheadAttentionPoolingHead``; the tokens are the post-layernorm last hidden state.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "vision_model.head."
KEYS = ("probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
        "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")


class SiglipPoolingHead(nn.Module):
    """Multi-head attention pooling: one learned probe attends to every token, then a residual MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, mlp_dim), "fc2": nn.Linear(mlp_dim, dim)})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Post-layernorm tokens [N, G, D] -> pooled [N, D]."""
        probe = self.probe.to(tokens).expand(tokens.shape[0], -1, -1)
        x = self.attention(probe, tokens, tokens, need_weights=False)[0]
        h = self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.layernorm(x)), approximate="tanh"))
        return (x + h)[:, 0]


def has_head(keys) -> bool:
    """Whether a checkpoint's keys include the pooling head."""
    return all(PREFIX + k in keys for k in KEYS)


def head_from_state_dict(sd: Mapping[str, torch.Tensor], heads: int) -> SiglipPoolingHead:
    """The head from a SigLIP vision checkpoint's ``vision_model.head.*`` tensors (float32)."""
    missing = [PREFIX + k for k in KEYS if PREFIX + k not in sd]
    if missing:
        raise ValueError(f"the SigLIP file has no attention-pooling head (missing {', '.join(missing[:3])} ...)")
    dim = int(sd[PREFIX + "probe"].shape[-1])
    mlp_dim = int(sd[PREFIX + "mlp.fc1.weight"].shape[0])
    if dim % heads:
        raise ValueError(f"SigLIP width {dim} is not a multiple of {heads} heads")
    head = SiglipPoolingHead(dim, heads, mlp_dim)
    head.load_state_dict({k: sd[PREFIX + k].float() for k in KEYS}, strict=True)
    return head.eval().requires_grad_(False)
