"""Learnable token S* and the Deviation Extraction Module (Eqs. 3-5 of 002), models/dem.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_troupe.models.adapter_file import AdapterFormatError
from comfyui_troupe.models.reference.dem import (
    REDUX_TOKENS,
    Alignment,
    DeviationExtractionModule,
    insert_positions,
    insert_tokens,
    load_dem,
)

D, DR, HEADS = 32, 24, 4


def random_dem(seed=0) -> DeviationExtractionModule:
    torch.manual_seed(seed)
    dem = DeviationExtractionModule(dim=D, redux_dim=DR, heads=HEADS, mlp_ratio=2.0)
    with torch.no_grad():
        for name, p in dem.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if name.endswith("norm.weight")
                                                                                  else 0.0))
    return dem.eval()


def ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def mha(q_in, kv_in, sd, prefix):
    """softmax(Q K^T / sqrt(d)) V per head, then to_out: written out with matmuls."""
    q = q_in @ sd[prefix + ".to_q.weight"].T
    k = kv_in @ sd[prefix + ".to_k.weight"].T
    v = kv_in @ sd[prefix + ".to_v.weight"].T
    d = D // HEADS
    heads = []
    for h in range(HEADS):
        s = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(w @ v[..., s])
    return torch.cat(heads, -1) @ sd[prefix + ".to_out.weight"].T + sd[prefix + ".to_out.bias"]


def dem_by_hand(sd, concept, redux):
    c = concept + mha(ln(concept, sd, "self_attn.norm"), ln(concept, sd, "self_attn.norm"), sd, "self_attn")  # Eq. 3
    c = c + mha(ln(c, sd, "cross_attn.norm_q"), ln(redux, sd, "cross_attn.norm_kv"), sd, "cross_attn")  # Eq. 4
    h = ln(c, sd, "mlp.norm") @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    c = c + F.gelu(h) @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]  # Eq. 5
    return c[:, 0]


def test_dem_equals_eqs_3_to_5_computed_by_hand():
    dem = random_dem()
    sd = {k: v.detach() for k, v in dem.state_dict().items()}
    concept = torch.randn(2, 4, D)
    redux = torch.randn(2, 7, DR)
    with torch.no_grad():
        torch.testing.assert_close(dem(concept, redux), dem_by_hand(sd, concept, redux), atol=1e-5, rtol=1e-5)


def test_insert_positions_before_each_label():
    star, concept = insert_positions([[5, 6], [2, 3, 4]])
    assert star == [6, 2]  # subject 2's S* at 2 shifts subject 1's first token 5 -> 6
    assert concept == [[6, 7, 8], [2, 3, 4, 5]]
    ctx = torch.arange(10.0)[None, :, None]
    out, pos = insert_tokens(ctx, [[5, 6], [2, 3, 4]], torch.tensor([[[100.0], [200.0]]]))
    assert out[0, :, 0].tolist() == [0, 1, 200, 2, 3, 4, 100, 5, 6, 7, 8, 9]
    assert pos == [6, 2]


def test_only_s_star_changes_and_equals_the_dem():
    dem = random_dem(1)
    dem_full = DeviationExtractionModule(dim=D, redux_dim=D, heads=HEADS, mlp_ratio=2.0)
    dem_full.load_state_dict({k: (v if v.shape == dem_full.state_dict()[k].shape else torch.randn_like(
        dem_full.state_dict()[k]) * 0.3) for k, v in dem.state_dict().items()})
    labels = [[3, 4], [7]]
    n_t5 = 12
    ctx = torch.randn(2, n_t5 + 2 * REDUX_TOKENS, D)
    align = Alignment(dem_full.eval(), labels, n_t5)
    out, positions, blocked = align.apply(ctx, [True, False], run=None)
    assert out.shape == (2, n_t5 + 2, D)  # S* inserted per subject, Redux tokens removed
    star, concept = insert_positions(labels)
    keep = [i for i in range(n_t5 + 2) if i not in star]
    assert torch.equal(out[:, keep], ctx[:, :n_t5])  # every other token untouched
    raw = dem_full.s_star.detach()
    assert torch.equal(out[1, star[0]], raw) and torch.equal(out[1, star[1]], raw)  # unconditional: raw S*
    for j in range(2):
        c_concept = torch.cat([raw[None], ctx[0, labels[j]]], 0)[None]
        redux = ctx[0:1, n_t5 + REDUX_TOKENS * j: n_t5 + REDUX_TOKENS * (j + 1)]
        sd = {k: v.detach() for k, v in dem_full.state_dict().items()}
        torch.testing.assert_close(out[0, star[j]], dem_by_hand(sd, c_concept, redux)[0], atol=1e-5, rtol=1e-5)
    assert positions[0] == concept and positions[1] == [[], []]
    assert blocked == [[], star]


def test_missing_redux_tokens_is_a_clear_error():
    align = Alignment(random_dem(), [[1]], 8)
    with pytest.raises(ValueError, match="StyleModelApply"):
        align.apply(torch.randn(1, 8, D), [True])


def test_weights_load_from_the_documented_layout():
    dem = random_dem(2)
    sd = dict(dem.state_dict())
    loaded = load_dem(sd, {"format": "troupe.dem", "heads": str(HEADS)})
    concept, redux = torch.randn(1, 3, D), torch.randn(1, 5, DR)
    torch.testing.assert_close(loaded(concept, redux), dem(concept, redux).detach())
    assert set(sd) >= {"s_star", "self_attn.norm.weight", "self_attn.to_q.weight", "cross_attn.norm_kv.weight",
                       "cross_attn.to_k.weight", "mlp.fc1.weight", "mlp.fc2.bias"}
    bad = dict(sd)
    del bad["mlp.fc2.bias"]
    bad["mlp.fc3.weight"] = torch.zeros(1)
    with pytest.raises(AdapterFormatError, match=r"missing keys \['mlp.fc2.bias'\], unexpected keys \['mlp.fc3"):
        load_dem(bad)
    with pytest.raises(AdapterFormatError, match="not a DEM file"):
        load_dem({"x": torch.zeros(1)})
