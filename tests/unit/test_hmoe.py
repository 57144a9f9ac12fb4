"""HMoE fusion (Eqs. 6-8 of 004) against an independent functional computation from the raw weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from comfyui_troupe.models.encoding.hmoe import (
    FusionCheckpointError,
    HMoE,
    HMoEConfig,
    hmoe_from_state_dict,
    hmoe_metadata,
    normalise_weights,
)

CONFIG = HMoEConfig(in_dim=32, out_dim=48, router_hidden=16)


@pytest.fixture
def module():
    torch.manual_seed(0)
    m = HMoE(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():  # not the init: make every weight matter (LayerNorm affine included)
            p.normal_(0, 0.3)
    return m


@pytest.fixture
def hidden():
    torch.manual_seed(1)
    return torch.randn(2, 3, 5, CONFIG.in_dim)  # 2 subjects, 3 levels, 5 tokens (CLS + 4 patches)


def independent(sd: dict, hidden: torch.Tensor, weights: torch.Tensor | None = None):
    """Eqs. 6-8 written out with torch.nn.functional on the checkpoint tensors."""
    experts = []
    for l in range(3):
        x = F.linear(hidden[:, l], sd[f"experts.{l}.0.weight"], sd[f"experts.{l}.0.bias"])
        x = F.gelu(x)
        x = F.layer_norm(x, (x.shape[-1],), sd[f"experts.{l}.2.weight"], sd[f"experts.{l}.2.bias"], eps=1e-5)
        experts.append(x)  # Eq. 6
    cls = torch.cat([hidden[:, l, 0] for l in range(3)], dim=-1)
    h = torch.tanh(F.linear(cls, sd["router.0.weight"], sd["router.0.bias"]))
    routed = torch.softmax(F.linear(h, sd["router.2.weight"], sd["router.2.bias"]), -1)  # Eq. 7
    w = routed if weights is None else weights
    fused = sum(w[:, l, None, None] * experts[l] for l in range(3))  # Eq. 8
    return fused, routed, experts


def test_weights_sum_to_one_and_fusion_is_the_weighted_sum(module, hidden):
    with torch.no_grad():
        out = module(hidden)
    sd = module.state_dict()
    fused, routed, _experts = independent(sd, hidden)
    assert torch.allclose(out.routed_weights.sum(-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(out.routed_weights, routed, atol=1e-6)
    assert torch.equal(out.weights, out.routed_weights)
    assert torch.allclose(out.fused, fused, atol=1e-5)
    assert out.fused.shape == (2, 5, CONFIG.out_dim)
    # the routing really depends on the image: two subjects get different weights
    assert not torch.allclose(out.routed_weights[0], out.routed_weights[1])


def test_override_reproduces_the_chosen_weights_exactly(module, hidden):
    with torch.no_grad():
        out = module(hidden, override=torch.tensor([[2.0, 1.0, 1.0]]))
        per_subject = module(hidden, override=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    assert out.weights.tolist() == [[0.5, 0.25, 0.25]] * 2
    fused, routed, experts = independent(module.state_dict(), hidden, out.weights)
    assert torch.allclose(out.fused, fused, atol=1e-5)
    assert torch.allclose(out.routed_weights, routed, atol=1e-6)  # the router's choice is still reported
    # a one-hot override returns exactly that expert's output
    assert torch.allclose(per_subject.fused[0], experts[0][0], atol=1e-6)
    assert torch.allclose(per_subject.fused[1], experts[2][1], atol=1e-6)


@pytest.mark.parametrize("bad,message", [([-1, 1, 1], ">= 0"), ([0, 0, 0], "must not all be 0"),
                                         ([float("nan"), 1, 1], "finite")])
def test_bad_override(bad, message):
    with pytest.raises(ValueError, match=message):
        normalise_weights(bad)


def test_save_load_round_trip(module, hidden, tmp_path):
    path = tmp_path / "fusion.safetensors"
    save_file(module.state_dict(), str(path), metadata=hmoe_metadata((10, 17, 24)))
    loaded = hmoe_from_state_dict(load_file(str(path)), encoder_width=CONFIG.in_dim)
    assert loaded.config == CONFIG
    with torch.no_grad():
        a, b = module(hidden), loaded(hidden)
    assert torch.equal(a.fused, b.fused) and torch.equal(a.routed_weights, b.routed_weights)


def test_wrong_width_names_the_keys_and_both_shapes(module):
    with pytest.raises(FusionCheckpointError) as err:
        hmoe_from_state_dict(module.state_dict(), encoder_width=1024)
    msg = str(err.value)
    assert "expects encoder width 32" in msg and "width 1024" in msg
    assert "experts.0.0.weight (48, 32)" in msg and "router.0.weight (16, 96)" in msg


def test_missing_unexpected_and_misshaped_keys(module):
    sd = dict(module.state_dict())
    sd.pop("experts.2.2.bias")
    sd["experts.3.0.weight"] = torch.zeros(1)
    sd["router.0.bias"] = torch.zeros(17)
    with pytest.raises(FusionCheckpointError) as err:
        hmoe_from_state_dict(sd)
    msg = str(err.value)
    assert "missing keys: experts.2.2.bias" in msg
    assert "unexpected keys: experts.3.0.weight" in msg
    assert "router.0.bias (17,) (expected (16,))" in msg
    with pytest.raises(FusionCheckpointError, match="not an HMoE fusion checkpoint: missing keys"):
        hmoe_from_state_dict({"image_proj.weight": torch.zeros(2)})
