"""TroupeApplyFLUX on the tiny FLUX fixture: DDS (Eqs. 4-5 of 004) and mask-guided injection (Eq. 9 of 004).

Block-level checks feed every block the inputs it received in a base-model forward (recorded once), then
compare the base block with the patched block on those same inputs: self-attention spreads any change to
every token in the next block, so "identical at every block" is a statement about each block's own output.
The expected values come from an independent re-implementation of the FLUX double / single block written
here (explicit softmax attention, ComfyUI's RoPE), with the injection added to its attention output.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from fixtures.flux_adapters import troupe_flux_state_dict
from fixtures.tiny_models import ensure_comfy, flux_conditioning, sample, tiny_flux

pytest_plugins = ["lifecycle_probe"]  # the runs and clones fixtures


LATENT = (10, 7)  # odd width: ComfyUI pads to 2x2 patches -> token grid 5 x 4
GRID = (5, 4)


@pytest.fixture(scope="module")
def mods():
    ensure_comfy()
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.models.flux import adapter as flux_adapter
    from comfyui_troupe.models.flux import injection as flux_injection
    from comfyui_troupe.models.flux import patch as flux_patch
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.nodes import flux

    return {"adapter": flux_adapter, "patch": flux_patch, "injection": flux_injection, "Layout": Layout, "Region": Region, "ClipFeatures": ClipFeatures,
                "node": flux}


@pytest.fixture(scope="module")
def base():
    return tiny_flux()


@pytest.fixture(scope="module")
def adapter(mods):
    return mods["adapter"].load(troupe_flux_state_dict(), "troupe-flux")


def features(mods, n: int, seed: int = 0, width: int = 64, tokens: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return mods["ClipFeatures"](hidden=torch.randn(n, 3, tokens, width, generator=gen), layers=(10, 17, 24),
                                encoder="tiny", labels=tuple("abcdefgh"[:n]), depth=24)


def two_subject_layout(mods):
    """Subject 1: token column 0 and half of column 1 (all rows); subject 2: columns 1-3 in rows 0-2.

    Overlap: column 1, rows 0-2; disjoint: column 0 and columns 2-3; a fractional (0.5) mask value in column 1.
    """
    R = mods["Region"]
    # latent 10 x 7 -> token grid 5 x 4; boxes on whole latent pixels so the hand-made masks below are exact
    return mods["Layout"](64, 80, (R(box=(0.0, 0.0, 3 / 7, 1.0)), R(box=(2 / 7, 0.0, 1.0, 0.6))))


def hand_masks() -> torch.Tensor:
    """M_i of two_subject_layout at the 5 x 4 token grid, by hand: coverage of each 2x2 patch's real pixels."""
    m = torch.zeros(2, 5, 4)
    m[0, :, 0] = 1.0  # latent cols 0-2: token col 0 and half of token col 1 (latent cols 2, 3); every row
    m[0, :, 1] = 0.5
    m[1, 0:3, 1:4] = 1.0  # latent cols 2-6 = token cols 1-3 (col 3 = latent col 6 + padding, which does not
    #                       count); latent rows 0-5 = token rows 0-2
    return m.flatten(1)


def settings(mods, weight=1.0, branches="image branch only", start=0.0, end=1.0):
    return mods["node"].ApplySettings(weight, start, end, branches)


# --------------------------------------------------------------------------- running blocks


def call_model(model, x, sigma, cond, transformer_options=None, cond_or_uncond=None, **extra_conds):
    """model.apply_model the way calc_cond_batch calls it (sigmas and cond_or_uncond in transformer_options)."""
    context, extra = cond[0]
    to = copy.copy(model.model_options.get("transformer_options", {}))
    to.update(transformer_options or {})
    to["sigmas"] = sigma
    if cond_or_uncond is not None:
        to["cond_or_uncond"] = cond_or_uncond
    b = x.shape[0]
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=context.expand(b, -1, -1),
                                       y=extra["pooled_output"].expand(b, -1), guidance=torch.full((b,), 3.5),
                                       transformer_options=to, **extra_conds)


def block_fn(dm, kind: str, i: int):
    """What forward_orig passes as ``original_block``."""
    block = (dm.double_blocks if kind == "double_block" else dm.single_blocks)[i]
    if kind == "double_block":
        def run(a):
            img, txt = block(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"], attn_mask=a.get("attn_mask"),
                             transformer_options=a.get("transformer_options"))
            return {"img": img, "txt": txt}
    else:
        def run(a):
            return {"img": block(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=a.get("attn_mask"),
                                 transformer_options=a.get("transformer_options"))}
    return run


def clone_args(a: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def record_inputs(base, mods, x, sigma, cond, latent_hw, **kwargs) -> dict:
    """Every block's inputs in one base forward, with the geometry the diffusion-model wrapper would add."""
    store = {}
    clone = base.clone()
    dm = base.model.diffusion_model
    for kind, n in (("double_block", len(dm.double_blocks)), ("single_block", len(dm.single_blocks))):
        for i in range(n):
            def rec(args, extra, key=(kind, i)):
                a = clone_args(args)
                a["transformer_options"] = dict(args["transformer_options"])
                a["transformer_options"][mods["patch"].GEOMETRY_KEY] = (*latent_hw, cond[0][0].shape[1])
                store[key] = a
                return extra["original_block"](args)
            clone.set_model_patch_replace(rec, "dit", kind, i)
    call_model(clone, x, sigma, cond, **kwargs)
    return store


@pytest.fixture(scope="module")
def recorded(base, mods):
    """Every block's inputs in one base forward at sigma 0.6 (batch 2, latent 10 x 7, 64 text tokens)."""
    x = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(3))
    return record_inputs(base, mods, x, torch.full((2,), 0.6), flux_conditioning(0), LATENT)


def run_block(model, base, key, args):
    """The block at ``key`` of ``model`` (its replace patch when it has one) on a copy of ``args``."""
    dm = base.model.diffusion_model
    orig = block_fn(dm, *key)
    patch = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}).get(key)
    with torch.inference_mode():
        a = clone_args(args)
        return patch(a, {"original_block": orig}) if patch is not None else orig(a)


# --------------------------------------------------------------------------- independent reference


def attention_ref(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def merge(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def ref_double(blk, img, txt, vec, pe, add_img=0.0, add_txt=0.0):
    """FLUX double block (black-forest-labs layers.py), attention outputs plus the given additions."""
    from comfy.ldm.flux.math import apply_rope

    h, d = blk.num_heads, blk.hidden_size
    im1, im2 = blk.img_mod(vec)
    tm1, tm2 = blk.txt_mod(vec)

    def qkv(attn, norm, x, m):
        y = attn.qkv(norm(x) * (1 + m.scale) + m.shift)
        q, k, v = y[..., :d], y[..., d:2 * d], y[..., 2 * d:]
        return attn.norm.query_norm(heads(q, h)), attn.norm.key_norm(heads(k, h)), heads(v, h)

    iq, ik, iv = qkv(blk.img_attn, blk.img_norm1, img, im1)
    tq, tk, tv = qkv(blk.txt_attn, blk.txt_norm1, txt, tm1)
    q, k = apply_rope(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), pe)
    a = merge(attention_ref(q, k, torch.cat([tv, iv], 2)))
    ta, ia = a[:, :txt.shape[1]] + add_txt, a[:, txt.shape[1]:] + add_img
    img = img + im1.gate * blk.img_attn.proj(ia)
    img = img + im2.gate * blk.img_mlp(blk.img_norm2(img) * (1 + im2.scale) + im2.shift)
    txt = txt + tm1.gate * blk.txt_attn.proj(ta)
    txt = txt + tm2.gate * blk.txt_mlp(blk.txt_norm2(txt) * (1 + tm2.scale) + tm2.shift)
    return img, txt


def ref_single(blk, x, vec, pe, add=0.0):
    """FLUX single block, attention output plus the given addition."""
    from comfy.ldm.flux.math import apply_rope

    h, d = blk.num_heads, blk.hidden_size
    mod = blk.modulation(vec)[0]
    y = blk.linear1(blk.pre_norm(x) * (1 + mod.scale) + mod.shift)
    q, k, v, mlp = y[..., :d], y[..., d:2 * d], y[..., 2 * d:3 * d], y[..., 3 * d:]
    q, k = blk.norm.query_norm(heads(q, h)), blk.norm.key_norm(heads(k, h))
    q, k = apply_rope(q, k, pe)
    a = merge(attention_ref(q, k, heads(v, h))) + add
    return x + mod.gate * blk.linear2(torch.cat([a, blk.mlp_act(mlp)], 2))


def block_query_ref(blk, x, vec, kind, branch="img"):
    """The block's pre-RoPE query, written out: norm, modulate, the q third of qkv, per-head RMSNorm."""
    h, d = blk.num_heads, blk.hidden_size
    if kind == "double_block":
        m = (blk.img_mod if branch == "img" else blk.txt_mod)(vec)[0]
        norm1 = blk.img_norm1 if branch == "img" else blk.txt_norm1
        attn = blk.img_attn if branch == "img" else blk.txt_attn
        q = attn.qkv(norm1(x) * (1 + m.scale) + m.shift)[..., :d]
        return attn.norm.query_norm(heads(q, h))
    m = blk.modulation(vec)[0]
    q = blk.linear1(blk.pre_norm(x) * (1 + m.scale) + m.shift)[..., :d]
    return blk.norm.query_norm(heads(q, h))


def kv_ref(sd, prefix, tokens, h):
    """K_C, V_C of Eq. 2: linear projections of C, RMSNorm with the learned scale on K (troupe-flux)."""
    k = heads(tokens @ sd[f"{prefix}.to_k_ip.weight"].T, h)
    v = heads(tokens @ sd[f"{prefix}.to_v_ip.weight"].T, h)
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"{prefix}.norm_k.scale"]
    return k, v


def tokens_ref(sd, feats):
    """troupe-flux image projection: LayerNorm(Linear(encoder tokens))."""
    y = feats.tokens() @ sd["image_proj.proj.weight"].T + sd["image_proj.proj.bias"]
    return torch.nn.functional.layer_norm(y, (y.shape[-1],), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])


def eq9_ref(q, sd, prefix, tokens, lam, masks):
    """sum_i lambda_i * M_i (.) CA(q, C_i) (Eq. 9 of 004), one subject at a time."""
    out = 0.0
    for i in range(tokens.shape[0]):
        k, v = kv_ref(sd, prefix, tokens[i:i + 1], q.shape[1])
        ca = merge(attention_ref(q, k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)))
        m = 1.0 if masks is None else masks[i].view(1, -1, 1)
        out = out + lam[i] * m * ca
    return out


# --------------------------------------------------------------------------- tests


def test_reference_block_matches_comfyui(base, recorded):
    """Guards the independent reference: with nothing added it reproduces ComfyUI's blocks."""
    dm = base.model.diffusion_model
    with torch.inference_mode():
        a = recorded[("double_block", 0)]
        out = run_block(base, base, ("double_block", 0), a)
        img, txt = ref_double(dm.double_blocks[0], a["img"], a["txt"], a["vec"], a["pe"])
        torch.testing.assert_close(out["img"], img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["txt"], txt, atol=1e-5, rtol=1e-5)
        a = recorded[("single_block", 1)]
        out = run_block(base, base, ("single_block", 1), a)
        torch.testing.assert_close(out["img"], ref_single(dm.single_blocks[1], a["img"], a["vec"], a["pe"]),
                                   atol=1e-5, rtol=1e-5)


def test_weight_zero_is_the_base_model_exactly(base, adapter, mods):
    feats = features(mods, 2)
    patched = mods["node"].apply_flux(base, adapter, feats, settings(mods, weight=0.0), layout=two_subject_layout(mods))
    pos, neg = flux_conditioning(0), flux_conditioning(1)
    latent = torch.zeros(1, 16, *LATENT)
    assert torch.equal(sample(base, pos, neg, latent, steps=3), sample(patched, pos, neg, latent, steps=3))
    # and the same with real CFG (uncond batch present)
    assert torch.equal(sample(base, pos, neg, latent, steps=2, cfg=2.5),
                       sample(patched, pos, neg, latent, steps=2, cfg=2.5))


def test_eq9_two_subjects_overlapping_and_disjoint_regions(base, adapter, mods, recorded):
    """Every block's output equals the reference block with sum_i lambda_i M_i CA(X, C_i) added (Eq. 9 of 004)."""
    feats = features(mods, 2, seed=4)
    layout = two_subject_layout(mods)
    masks = hand_masks()
    torch.testing.assert_close(mods["injection"].token_masks(layout, *LATENT), masks)  # the node's M_i, by hand
    assert bool((masks[0] * masks[1]).any()) and bool(((masks[0] > 0) ^ (masks[1] > 0)).any())  # overlap + disjoint
    subjects = [type("S", (), {"weight": w})() for w in (0.8, 1.5)]
    patched = mods["node"].apply_flux(base, adapter, feats, settings(mods, weight=1.25), subjects=subjects,
                                      layout=layout)
    lam = [1.25 * 0.8, 1.25 * 1.5]
    sd = troupe_flux_state_dict()
    tokens = tokens_ref(sd, feats)
    dm = base.model.diffusion_model
    n_img = GRID[0] * GRID[1]
    with torch.inference_mode():
        for i, blk in enumerate(dm.double_blocks):
            a = recorded[("double_block", i)]
            q = block_query_ref(blk, a["img"], a["vec"], "double_block")
            add = eq9_ref(q, sd, f"double_blocks.{i}", tokens, lam, masks)
            img, txt = ref_double(blk, a["img"], a["txt"], a["vec"], a["pe"], add_img=add)
            out = run_block(patched, base, ("double_block", i), a)
            torch.testing.assert_close(out["img"], img, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out["txt"], txt, atol=2e-5, rtol=1e-5)
            assert not torch.allclose(out["img"], run_block(base, base, ("double_block", i), a)["img"])
        for i, blk in enumerate(dm.single_blocks):
            a = recorded[("single_block", i)]
            rows = a["img"][:, 64:64 + n_img]
            q = block_query_ref(blk, rows, a["vec"], "single_block")
            add = torch.zeros_like(a["img"])
            add[:, 64:64 + n_img] = eq9_ref(q, sd, f"single_blocks.{i}", tokens, lam, masks)
            out = run_block(patched, base, ("single_block", i), a)
            torch.testing.assert_close(out["img"], ref_single(blk, a["img"], a["vec"], a["pe"], add=add),
                                       atol=2e-5, rtol=1e-5)


def test_outside_all_regions_and_text_tokens_equal_base_at_every_block(base, adapter, mods, recorded):
    """Image branch only: text tokens and image tokens outside every region equal the base block's exactly."""
    feats = features(mods, 2, seed=5)
    patched = mods["node"].apply_flux(base, adapter, feats, settings(mods), layout=mods["Layout"](
        64, 80, (mods["Region"](box=(0.0, 0.0, 0.5, 0.4)), mods["Region"](box=(0.5, 0.6, 1.0, 1.0)))))
    masks = mods["injection"].token_masks(patched.model_options["transformer_options"]["patches_replace"]["dit"][
        ("double_block", 0)].patch.layout, *LATENT)
    outside = masks.sum(0) == 0
    assert bool(outside.any()) and bool((~outside).any())
    n_img = outside.numel()
    for key, a in recorded.items():
        out, ref = run_block(patched, base, key, a), run_block(base, base, key, a)
        if key[0] == "double_block":
            assert torch.equal(out["txt"], ref["txt"]), key
            img_out, img_ref = out["img"][:, :n_img], ref["img"][:, :n_img]
        else:
            assert torch.equal(out["img"][:, :64], ref["img"][:, :64]), key  # the text part of the joint stream
            img_out, img_ref = out["img"][:, 64:64 + n_img], ref["img"][:, 64:64 + n_img]
        assert torch.equal(img_out[:, outside], img_ref[:, outside]), key
        assert not torch.allclose(img_out[:, ~outside], img_ref[:, ~outside]), key


def test_both_branches_changes_the_text_tokens_eq5(base, adapter, mods, recorded):
    """Both branches (Eq. 5 of 004): text tokens receive sum_i lambda_i CA(T, C_i) (no mask on text)."""
    feats = features(mods, 2, seed=6)
    layout = two_subject_layout(mods)
    patched = mods["node"].apply_flux(base, adapter, feats, settings(mods, branches="both branches"), layout=layout)
    sd = troupe_flux_state_dict()
    tokens = tokens_ref(sd, feats)
    dm = base.model.diffusion_model
    masks = hand_masks()
    with torch.inference_mode():
        for i, blk in enumerate(dm.double_blocks):
            a = recorded[("double_block", i)]
            out = run_block(patched, base, ("double_block", i), a)
            base_out = run_block(base, base, ("double_block", i), a)
            assert not torch.allclose(out["txt"], base_out["txt"])
            qi = block_query_ref(blk, a["img"], a["vec"], "double_block", "img")
            qt = block_query_ref(blk, a["txt"], a["vec"], "double_block", "txt")
            img, txt = ref_double(blk, a["img"], a["txt"], a["vec"], a["pe"],
                                  add_img=eq9_ref(qi, sd, f"double_blocks.{i}", tokens, [1.0, 1.0], masks),
                                  add_txt=eq9_ref(qt, sd, f"double_blocks.{i}", tokens, [1.0, 1.0], None))
            torch.testing.assert_close(out["txt"], txt, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out["img"], img, atol=2e-5, rtol=1e-5)
        for i, blk in enumerate(dm.single_blocks):
            a = recorded[("single_block", i)]
            out = run_block(patched, base, ("single_block", i), a)
            base_out = run_block(base, base, ("single_block", i), a)
            assert not torch.allclose(out["img"][:, :64], base_out["img"][:, :64])


def test_base_model_unchanged_after_apply_and_sampling(base, adapter, mods):
    pos, neg = flux_conditioning(0), flux_conditioning(1)
    latent = torch.zeros(1, 16, *LATENT)
    before = sample(base, pos, neg, latent, steps=2)
    options = copy.deepcopy(base.model_options)
    weights = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    patched = mods["node"].apply_flux(base, adapter, features(mods, 3), settings(mods))
    after_patched = sample(patched, pos, neg, latent, steps=2)
    assert not torch.equal(before, after_patched)
    assert base.model_options == options
    assert "patches_replace" not in base.model_options.get("transformer_options", {})
    assert all(torch.equal(v, base.model.diffusion_model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(before, sample(base, pos, neg, latent, steps=2))


def test_kv_computed_once_per_run_and_released(base, adapter, mods, monkeypatch, runs):
    """K/V do not depend on the timestep: one projection per block per run, nothing kept after the run."""
    patched = mods["node"].apply_flux(base, adapter, features(mods, 2), settings(mods))
    calls = []
    layer_cls = type(adapter.module.layers[0])
    original = layer_cls.kv
    monkeypatch.setattr(layer_cls, "kv", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    pos, neg = flux_conditioning(0), flux_conditioning(1)
    sample(patched, pos, neg, torch.zeros(1, 16, 8, 8), steps=4, cfg=2.0)
    assert len(calls) == 4  # 2 double + 2 single blocks, not 4 steps x 2 passes x 4 blocks
    assert len(runs.states) == 1 and runs.states[0].held and not runs.leftover()
    sample(patched, pos, neg, torch.zeros(1, 16, 8, 8), steps=2)
    assert len(calls) == 8 and len(runs.states) == 2 and not runs.leftover()


def test_real_cfg_uncond_gets_no_subject_features(base, adapter, mods):
    """cond_or_uncond [1, 0] (uncond first, as ComfyUI may batch it): the uncond rows equal the base model's."""
    patched = mods["node"].apply_flux(base, adapter, features(mods, 1), settings(mods))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.7)
    cond = flux_conditioning(0)
    out = call_model(patched, x, sigma, cond, cond_or_uncond=[1, 0])
    ref = call_model(base, x, sigma, cond, cond_or_uncond=[1, 0])
    assert torch.equal(out[0], ref[0])
    assert not torch.allclose(out[1], ref[1])


def test_start_end_window_and_batch(base, adapter, mods):
    """Outside [start, end] nothing is injected; a batch of 2 gives each item what a batch of 1 gives."""
    feats = features(mods, 2)
    pos, neg = flux_conditioning(0), flux_conditioning(1)
    latent = torch.zeros(2, 16, 9, 9)
    off = mods["node"].apply_flux(base, adapter, feats, settings(mods, start=1.0, end=1.0))
    assert torch.equal(sample(base, pos, neg, latent, steps=3), sample(off, pos, neg, latent, steps=3))
    on = mods["node"].apply_flux(base, adapter, feats, settings(mods), layout=two_subject_layout(mods))
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((2,), 0.5)
    both = call_model(on, x, sigma, pos)
    one = call_model(on, x[1:], sigma[1:], pos)
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)
    late = mods["node"].apply_flux(base, adapter, feats, settings(mods, start=0.5, end=1.0))
    early_sigma = torch.full((2,), 0.95)  # sigma above percent_to_sigma(0.5): not injected yet
    assert torch.equal(call_model(late, x, early_sigma, pos), call_model(base, x, early_sigma, pos))


def test_wraps_an_existing_replace_patch_and_two_applies_do_not_interfere(base, adapter, mods):
    """A replace patch already at a key (the reference branch) keeps running, inside ours; one loader feeding
    two Apply nodes gives two independent models."""
    calls = []

    def earlier(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    pre = base.clone()
    pre.set_model_patch_replace(earlier, "dit", "double_block", 1)
    patched = mods["node"].apply_flux(pre, adapter, features(mods, 1), settings(mods))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma, cond = torch.full((1,), 0.5), flux_conditioning(0)
    out = call_model(patched, x, sigma, cond)
    assert len(calls) == 1
    assert not torch.equal(out, call_model(base, x, sigma, cond))

    m1 = mods["node"].apply_flux(base, adapter, features(mods, 1, seed=1), settings(mods, weight=1.0))
    first = call_model(m1, x, sigma, cond)
    m2 = mods["node"].apply_flux(base, adapter, features(mods, 1, seed=2), settings(mods, weight=2.0))
    assert torch.equal(call_model(m1, x, sigma, cond), first)
    assert not torch.equal(call_model(m2, x, sigma, cond), first)
    # chained: Apply on an Apply output injects both
    chained = mods["node"].apply_flux(m1, adapter, features(mods, 1, seed=2), settings(mods, weight=2.0))
    c = call_model(chained, x, sigma, cond)
    assert not torch.equal(c, first) and not torch.equal(c, call_model(m2, x, sigma, cond))


def test_schnell_and_odd_sizes_sample(adapter, mods):
    schnell = tiny_flux(schnell=True)
    patched = mods["node"].apply_flux(schnell, adapter, features(mods, 3), settings(mods), layout=mods["Layout"](
        64, 64, tuple(mods["Region"](box=(i / 3, 0.0, (i + 1) / 3, 1.0)) for i in range(3))))
    pos, neg = flux_conditioning(0, guidance=None), flux_conditioning(1, guidance=None)
    for size in ((7, 5), (12, 9), (1, 1)):
        latent = torch.zeros(2, 16, *size)
        out = sample(patched, pos, neg, latent, steps=2)
        ref = sample(schnell, pos, neg, latent, steps=2)
        assert out.shape == latent.shape and torch.isfinite(out).all()
        assert not torch.equal(out, ref)


def test_xlabs_layout_adds_to_the_double_block_image_output(base, mods, recorded):
    """XLabs' FLUX IP-Adapter (double blocks only): img_out = block(img) + sum_i lambda_i M_i CA(X, C_i) with
    K/V = Linear + bias, no normalisation; single blocks stay the base model's."""
    from fixtures.flux_adapters import xlabs_state_dict

    sd = xlabs_state_dict()
    adapter = mods["adapter"].load(sd, mods["adapter"].detect(sd))
    assert adapter.format == "xlabs-flux"
    gen = torch.Generator().manual_seed(11)
    pooled = torch.randn(2, 48, generator=gen)
    feats = mods["ClipFeatures"](hidden=torch.randn(2, 3, 6, 64), layers=(10, 17, 24), encoder="tiny",
                                 labels=("a", "b"), depth=24, image_embeds=pooled)
    patched = mods["node"].apply_flux(base, adapter, feats, settings(mods, weight=0.7), layout=two_subject_layout(mods))
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert ("single_block", 0) not in dit and ("double_block", 1) in dit
    y = pooled @ sd["ip_adapter_proj_model.proj.weight"].T + sd["ip_adapter_proj_model.proj.bias"]
    tokens = torch.nn.functional.layer_norm(y.view(2, 4, 4096), (4096,), sd["ip_adapter_proj_model.norm.weight"],
                                            sd["ip_adapter_proj_model.norm.bias"])
    masks = hand_masks()
    dm = base.model.diffusion_model
    n_img = GRID[0] * GRID[1]
    with torch.inference_mode():
        for i, blk in enumerate(dm.double_blocks):
            a = recorded[("double_block", i)]
            q = block_query_ref(blk, a["img"], a["vec"], "double_block")
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
            add = 0.0
            for s in range(2):
                k = heads(tokens[s:s + 1] @ sd[p + "k_proj.weight"].T + sd[p + "k_proj.bias"], 2).expand(2, -1, -1, -1)
                v = heads(tokens[s:s + 1] @ sd[p + "v_proj.weight"].T + sd[p + "v_proj.bias"], 2).expand(2, -1, -1, -1)
                add = add + 0.7 * masks[s].view(1, -1, 1) * merge(attention_ref(q, k, v))
            ref = run_block(base, base, ("double_block", i), a)
            out = run_block(patched, base, ("double_block", i), a)
            torch.testing.assert_close(out["img"][:, :n_img], ref["img"][:, :n_img] + add, atol=2e-5, rtol=1e-5)
            assert torch.equal(out["txt"], ref["txt"])
        for i in range(len(dm.single_blocks)):
            a = recorded[("single_block", i)]
            assert torch.equal(run_block(patched, base, ("single_block", i), a)["img"],
                               run_block(base, base, ("single_block", i), a)["img"])


def test_kontext_reference_latents_get_no_subject_features(base, adapter, mods):
    """Reference latents (Kontext, ReferenceLatent) appended after the image tokens are not image tokens: every
    block leaves their rows as the base block does."""
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(8))
    ref = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(9))
    sigma, cond = torch.full((1,), 0.5), flux_conditioning(0)
    store = record_inputs(base, mods, x, sigma, cond, (8, 8), ref_latents=[ref])
    patched = mods["node"].apply_flux(base, adapter, features(mods, 2), settings(mods))
    n_img, n_ref = 16, 9
    for key, a in store.items():
        out, want = run_block(patched, base, key, a), run_block(base, base, key, a)
        start = n_img if key[0] == "double_block" else 64 + n_img
        assert out["img"].shape[1] == start + n_ref, key
        assert torch.equal(out["img"][:, start:], want["img"][:, start:]), key
        assert not torch.equal(out["img"][:, start - n_img:start], want["img"][:, start - n_img:start]), key
    out = call_model(patched, x, sigma, cond, ref_latents=[ref])
    assert out.shape == x.shape and not torch.equal(out, call_model(base, x, sigma, cond, ref_latents=[ref]))


def test_an_existing_attention_override_keeps_running(base, adapter, mods):
    """Another pack's optimized_attention_override stays in the chain, and ours still injects."""
    seen = []

    def other(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    pre = base.clone()
    pre.model_options["transformer_options"]["optimized_attention_override"] = other
    patched = mods["node"].apply_flux(pre, adapter, features(mods, 1), settings(mods))
    plain = mods["node"].apply_flux(base, adapter, features(mods, 1), settings(mods))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    sigma, cond = torch.full((1,), 0.5), flux_conditioning(0)
    out = call_model(patched, x, sigma, cond)
    assert len(seen) == 4  # every block's attention went through it
    assert torch.equal(out, call_model(plain, x, sigma, cond))
    assert not torch.equal(out, call_model(base, x, sigma, cond))
