"""Image projections of the SDXL adapters, under the names their checkpoints use (``image_proj.*``).

- ``Resampler`` with ``queries="grounding"``: MS-Diffusion's grounding resampler (Sec. 3.1 of 000). Each
  subject's queries come from its phrase embedding and the Fourier code of its box, then a perceiver reads
  the subject's CLIP tokens.
- ``Resampler`` with ``queries="latents"``: IP-Adapter Plus (learned queries shared by every image).
- ``ImageProjLinear``: IP-Adapter base (one Linear from the projected image embedding to a few tokens).

Axis legend: N subjects, G image tokens (CLS + patches), E image width, Q queries, W resampler width,
C output width (the UNet's cross-attention width, 2048 for SDXL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FOURIER_TEMPERATURE = 100.0


# --------------------------------------------------------------------------- box code


def fourier_box_code(boxes: torch.Tensor, num_freqs: int = 8, temperature: float = FOURIER_TEMPERATURE) -> torch.Tensor:
    """Fourier code of boxes [N, 4] -> [N, F * 2 * 4]: frequencies ``temperature ** (i / F)`` (no 2*pi).

    The flat order is (frequency, sin|cos, coordinate x0 y0 x1 y1), the order the published ``latent_proj``
    weights were trained with.
    """
    freqs = temperature ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)
    angles = boxes.float()[:, None, :] * freqs[None, :, None]  # [N, F, 4]
    return torch.stack((angles.sin(), angles.cos()), dim=2).flatten(1).to(boxes.dtype)  # [N, F, 2, 4] -> flat


# --------------------------------------------------------------------------- perceiver blocks


class PerceiverAttention(nn.Module):
    """Queries (latents) attend to the image tokens and to themselves; keys ``norm1``, ``norm2``, ``to_q``,
    ``to_kv``, ``to_out`` (no biases)."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, operations=nn, dtype=None, device=None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.norm2 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.to_q = operations.Linear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_kv = operations.Linear(dim, 2 * inner, bias=False, dtype=dtype, device=device)
        self.to_out = operations.Linear(inner, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)
        n, lq, _ = q.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [N, h, L, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, lq, -1))


def feed_forward(dim: int, mult: int, *, operations=nn, dtype=None, device=None) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear (no biases), keys ``0``, ``1``, ``3``."""
    return nn.Sequential(
        operations.LayerNorm(dim, dtype=dtype, device=device),
        operations.Linear(dim, dim * mult, bias=False, dtype=dtype, device=device),
        nn.GELU(),
        operations.Linear(dim * mult, dim, bias=False, dtype=dtype, device=device),
    )


# --------------------------------------------------------------------------- resampler


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of a perceiver resampler; MS-Diffusion: W 1280, depth 4, 20 heads x 64, Q 16, E 1664, C 2048."""

    dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    num_queries: int = 16
    embedding_dim: int = 1664
    output_dim: int = 2048
    ff_mult: int = 4
    queries: str = "grounding"  # "grounding" (MS-Diffusion) | "latents" (IP-Adapter Plus)
    phrase_dim: int = 768
    fourier_freqs: int = 8
    attention_norm: bool = True  # MS-Diffusion normalises before proj_out; IP-Adapter Plus does not

    @property
    def grounding_dim(self) -> int:
        """Width of ``cat(phrase, Fourier(box))``: 768 + 8 * 2 * 4 = 832 for MS-Diffusion."""
        return self.phrase_dim + self.fourier_freqs * 2 * 4


class Resampler(nn.Module):
    """Perceiver resampler: Q queries per image read its tokens through ``depth`` attention + FF blocks.

    With ``queries="grounding"`` (Sec. 3.1 of 000, MS-Diffusion) each subject's queries are
    ``LayerNorm(Linear(GELU(Linear(cat(phrase, Fourier(box))))))`` reshaped to [Q, W].
    """

    def __init__(self, config: ResamplerConfig, *, operations=nn, dtype=None, device=None):
        super().__init__()
        c = config
        if c.queries not in ("grounding", "latents"):
            raise ValueError(f"queries must be 'grounding' or 'latents', got {c.queries!r}")
        self.config = c
        if c.queries == "grounding":
            # only used by MS-Diffusion's training (dropped grounding); kept so the published file loads exactly
            self.grounding_latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim, dtype=dtype, device=device)
                                                  / c.dim ** 0.5)
            self.latent_proj = nn.Sequential(
                operations.Linear(c.grounding_dim, 2 * c.grounding_dim, dtype=dtype, device=device),
                nn.GELU(),
                operations.Linear(2 * c.grounding_dim, c.dim * c.num_queries, dtype=dtype, device=device),
            )
            self.latent_norm = operations.LayerNorm(c.dim, dtype=dtype, device=device)
        else:
            self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim, dtype=dtype, device=device) / c.dim ** 0.5)
        self.proj_in = operations.Linear(c.embedding_dim, c.dim, dtype=dtype, device=device)
        if c.attention_norm:
            self.attention_norm = operations.LayerNorm(c.dim, dtype=dtype, device=device)
        self.proj_out = operations.Linear(c.dim, c.output_dim, dtype=dtype, device=device)
        self.norm_out = operations.LayerNorm(c.output_dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.heads, c.dim_head, operations=operations, dtype=dtype, device=device),
                           feed_forward(c.dim, c.ff_mult, operations=operations, dtype=dtype, device=device)])
            for _ in range(c.depth)
        )

    def grounding_queries(self, boxes: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        """Sec. 3.1 of 000: the queries [N, Q, W] of each subject from its label embedding and box."""
        c = self.config
        code = torch.cat((phrases, fourier_box_code(boxes, c.fourier_freqs)), dim=-1)
        return self.latent_norm(self.latent_proj(code).unflatten(-1, (c.num_queries, c.dim)))

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None,
                phrases: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens [N, G, E] (+ boxes [N, 4] and phrases [N, P] for grounding) -> tokens [N, Q, C]."""
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.embedding_dim:
            raise ValueError(f"the resampler expects image tokens [N, G, {c.embedding_dim}], got {tuple(x.shape)}")
        if c.queries == "grounding":
            if boxes is None or phrases is None:
                raise ValueError("the grounding resampler needs each subject's box and phrase embedding")
            if boxes.shape != (x.shape[0], 4) or phrases.shape != (x.shape[0], c.phrase_dim):
                raise ValueError(f"expected boxes [{x.shape[0]}, 4] and phrases [{x.shape[0]}, {c.phrase_dim}], got "
                                 f"{tuple(boxes.shape)} and {tuple(phrases.shape)}")
            latents = self.grounding_queries(boxes.to(x), phrases.to(x))
        else:
            latents = self.latents.to(x).expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        if c.attention_norm:
            latents = self.attention_norm(latents)
        return self.norm_out(self.proj_out(latents))


# --------------------------------------------------------------------------- IP-Adapter base


class ImageProjLinear(nn.Module):
    """IP-Adapter base: the projected image embedding [N, P] -> Linear -> [N, T, C] -> LayerNorm."""

    def __init__(self, embedding_dim: int, output_dim: int = 2048, num_tokens: int = 4, *, operations=nn,
                 dtype=None, device=None):
        super().__init__()
        self.embedding_dim, self.output_dim, self.num_tokens = embedding_dim, output_dim, num_tokens
        self.proj = operations.Linear(embedding_dim, num_tokens * output_dim, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(output_dim, dtype=dtype, device=device)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.ndim != 2 or embeds.shape[-1] != self.embedding_dim:
            raise ValueError(f"expected image embeddings [N, {self.embedding_dim}], got {tuple(embeds.shape)}")
        return self.norm(self.proj(embeds).unflatten(-1, (self.num_tokens, self.output_dim)))
