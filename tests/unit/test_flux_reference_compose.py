"""The reference branch composed with TroupeApplyFLUX (issue 5) on the same FLUX model, in both orders.

ComfyUI keeps one replace patch per block key; each node wraps the patch it finds, so both must act.
"""
from __future__ import annotations

import pytest
import torch
from fixtures import tiny_models as tm
from fixtures.flux_adapters import troupe_flux_state_dict


@pytest.fixture(scope="module")
def env():
    tm.ensure_comfy()
    import comfy.ldm.flux.math

    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.models.flux import adapter as flux_adapter
    from comfyui_troupe.models.reference import branch as fr
    from comfyui_troupe.nodes import flux
    from comfyui_troupe.nodes.reference_branch import install_branch

    base = tm.tiny_flux()
    adapter = flux_adapter.load(troupe_flux_state_dict(), "troupe-flux")
    gen = torch.Generator().manual_seed(0)
    feats = ClipFeatures(hidden=torch.randn(2, 3, 6, 64, generator=gen), layers=(10, 17, 24), encoder="tiny",
                         labels=("a", "b"), depth=24)
    return {"fr": fr, "flux": flux, "install": install_branch, "base": base, "adapter": adapter, "feats": feats, "attention": comfy.ldm.flux.math.attention}


def with_refs(env, model, n=2):
    fr = env["fr"]
    dit = model.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    lats = [torch.randn(16, 8, 8, generator=g) for _ in range(n)]
    return env["install"](model, fr.ReferenceBranch(dit=dit, latents=lats, ref_subject=list(range(n)),
                                                    options=fr.ReferenceOptions()), env["attention"])


def with_adapter(env, model, weight=1.0):
    settings = env["flux"].ApplySettings(weight, 0.0, 1.0, "image branch only")
    return env["flux"].apply_flux(model, env["adapter"], env["feats"], settings)


def run(model):
    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    return tm.sample(model, pos, neg, torch.zeros(1, 16, 16, 16), steps=3)


def test_both_orders_apply_both_effects(env):
    base = env["base"]
    refs_only, adapter_only = run(with_refs(env, base)), run(with_adapter(env, base))
    a = run(with_adapter(env, with_refs(env, base)))
    b = run(with_refs(env, with_adapter(env, base)))
    for out in (a, b):
        assert torch.isfinite(out).all()
        assert (out - refs_only).abs().max() > 1e-4 and (out - adapter_only).abs().max() > 1e-4
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # the two wrappings compute the same thing


def test_no_references_leave_the_adapter_exactly(env):
    base = env["base"]
    adapter_only = run(with_adapter(env, base))
    assert torch.equal(run(with_refs(env, with_adapter(env, base), n=0)), adapter_only)
    assert torch.equal(run(with_adapter(env, with_refs(env, base, n=0))), adapter_only)


def test_adapter_at_weight_zero_leaves_the_reference_branch(env):
    base = env["base"]
    refs_only = run(with_refs(env, base))
    torch.testing.assert_close(run(with_adapter(env, with_refs(env, base), weight=0.0)), refs_only, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(with_refs(env, with_adapter(env, base, weight=0.0))), refs_only, atol=1e-6, rtol=0)
