"""Image projections of the SDXL adapters (Sec. 3.1 of 000: MS-Diffusion's grounding resampler; IP-Adapter)
against independent functional computations on the checkpoint tensors, and their published key layouts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_troupe.models.sdxl.resampler import ImageProjLinear, Resampler, ResamplerConfig, fourier_box_code

SMALL = {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "num_queries": 3, "embedding_dim": 24, "output_dim": 40, "ff_mult": 2,
             "phrase_dim": 12, "fourier_freqs": 8}


def shake(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every weight away from its init (LayerNorm affine included) so each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def ln(x, sd, key):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-5)


def perceiver(sd: dict, x: torch.Tensor, latents: torch.Tensor, depth: int, heads: int, attention_norm: bool):
    """The perceiver written out: per head, softmax(q k^T / sqrt(d)) over [image tokens; latents], then FF."""
    x = F.linear(x, sd["proj_in.weight"], sd["proj_in.bias"])
    for i in range(depth):
        p = f"layers.{i}."
        xn, ln_ = ln(x, sd, p + "0.norm1"), ln(latents, sd, p + "0.norm2")
        q = ln_ @ sd[p + "0.to_q.weight"].T
        kv = torch.cat([xn, ln_], 1) @ sd[p + "0.to_kv.weight"].T
        k, v = kv.chunk(2, -1)
        d = q.shape[-1] // heads
        outs = []
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), -1)
            outs.append(w @ v[..., s])
        latents = torch.cat(outs, -1) @ sd[p + "0.to_out.weight"].T + latents
        h_ = ln(latents, sd, p + "1.0") @ sd[p + "1.1.weight"].T
        latents = F.gelu(h_) @ sd[p + "1.3.weight"].T + latents
    if attention_norm:
        latents = ln(latents, sd, "attention_norm")
    return ln(F.linear(latents, sd["proj_out.weight"], sd["proj_out.bias"]), sd, "norm_out")


def test_fourier_box_code_order_and_frequencies():
    """Sec. 3.1 of 000 (MS-Diffusion): 8 frequencies 100 ** (i / 8), no 2*pi, flat order (freq, sin|cos, xyxy)."""
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.5, 1.0, 1.0]])
    code = fourier_box_code(boxes)
    assert code.shape == (2, 64)
    for n in range(2):
        for i in range(8):
            f = 100.0 ** (i / 8)
            for s, fn in enumerate((math.sin, math.cos)):
                for c in range(4):
                    assert code[n, i * 8 + s * 4 + c].item() == pytest.approx(fn(boxes[n, c].item() * f), abs=1e-5)


def test_grounding_resampler_equals_the_written_out_computation():
    """Sec. 3.1 of 000: queries = LN(Linear(GELU(Linear(cat(phrase, Fourier(box)))))) per subject, then perceiver."""
    cfg = ResamplerConfig(**SMALL, queries="grounding", attention_norm=True)
    m = shake(Resampler(cfg), 0)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    x, boxes = torch.randn(3, 7, 24, generator=gen), torch.rand(3, 4, generator=gen)
    phrases = torch.randn(3, 12, generator=gen)
    code = torch.cat([phrases, fourier_box_code(boxes)], -1)
    assert code.shape[-1] == cfg.grounding_dim == 12 + 64
    h = F.gelu(F.linear(code, sd["latent_proj.0.weight"], sd["latent_proj.0.bias"]))
    queries = F.linear(h, sd["latent_proj.2.weight"], sd["latent_proj.2.bias"]).reshape(3, 3, 32)
    queries = ln(queries, sd, "latent_norm")
    want = perceiver(sd, x, queries, depth=2, heads=2, attention_norm=True)
    with torch.no_grad():
        got = m(x, boxes, phrases)
    assert got.shape == (3, 3, 40)
    assert torch.allclose(got, want, atol=1e-5)
    # the box and the label each change the tokens; subjects do not see each other
    with torch.no_grad():
        moved = m(x, torch.cat([boxes[:1] * 0.5, boxes[1:]]), phrases)
    assert not torch.allclose(moved[0], got[0], atol=1e-4) and torch.allclose(moved[1:], got[1:], atol=1e-6)


def test_plus_resampler_has_learned_latents_and_no_attention_norm():
    """IP-Adapter Plus: the same perceiver with shared learned queries and no norm before proj_out."""
    cfg = ResamplerConfig(**SMALL, queries="latents", attention_norm=False)
    m = shake(Resampler(cfg), 2)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    assert "attention_norm.weight" not in sd and "latent_proj.0.weight" not in sd
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(3))
    want = perceiver(sd, x, sd["latents"].expand(2, -1, -1), depth=2, heads=2, attention_norm=False)
    with torch.no_grad():
        assert torch.allclose(m(x), want, atol=1e-5)


def test_linear_projection_of_ip_adapter_base():
    m = shake(ImageProjLinear(24, 40, 4), 4)
    e = torch.randn(3, 24)
    want = F.layer_norm((e @ m.proj.weight.T + m.proj.bias).reshape(3, 4, 40), (40,), m.norm.weight, m.norm.bias)
    with torch.no_grad():
        assert torch.allclose(m(e), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected image embeddings \[N, 24\], got \(3, 7, 24\)"):
        m(torch.randn(3, 7, 24))


def test_full_size_ms_diffusion_resampler_has_the_published_names_and_shapes():
    """MS-Diffusion's image_proj (inference.py): width 1280, depth 4, 20 x 64 heads, 16 queries, bigG 1664 in,
    2048 out, CLIP-L phrase 768; the keys of its ms_adapter.bin ``image_proj`` dict, written out here."""
    with torch.device("meta"):
        m = Resampler(ResamplerConfig())
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = {"grounding_latents": (1, 16, 1280), "latent_proj.0.weight": (1664, 832), "latent_proj.0.bias": (1664,),
            "latent_proj.2.weight": (20480, 1664), "latent_proj.2.bias": (20480,), "latent_norm.weight": (1280,),
            "latent_norm.bias": (1280,), "proj_in.weight": (1280, 1664), "proj_in.bias": (1280,),
            "attention_norm.weight": (1280,), "attention_norm.bias": (1280,), "proj_out.weight": (2048, 1280),
            "proj_out.bias": (2048,), "norm_out.weight": (2048,), "norm_out.bias": (2048,)}
    for i in range(4):
        p = f"layers.{i}."
        want |= {p + "0.norm1.weight": (1280,), p + "0.norm1.bias": (1280,), p + "0.norm2.weight": (1280,),
                 p + "0.norm2.bias": (1280,), p + "0.to_q.weight": (1280, 1280), p + "0.to_kv.weight": (2560, 1280),
                 p + "0.to_out.weight": (1280, 1280), p + "1.0.weight": (1280,), p + "1.0.bias": (1280,),
                 p + "1.1.weight": (5120, 1280), p + "1.3.weight": (1280, 5120)}
    assert shapes == want


def test_resampler_refuses_what_it_cannot_use():
    m = Resampler(ResamplerConfig(**SMALL))
    with pytest.raises(ValueError, match=r"expects image tokens \[N, G, 24\], got \(2, 7, 16\)"):
        m(torch.randn(2, 7, 16), torch.rand(2, 4), torch.randn(2, 12))
    with pytest.raises(ValueError, match="needs each subject's box and phrase embedding"):
        m(torch.randn(2, 7, 24))
    with pytest.raises(ValueError, match=r"expected boxes \[2, 4\] and phrases \[2, 12\]"):
        m(torch.randn(2, 7, 24), torch.rand(2, 4), torch.randn(2, 768))
