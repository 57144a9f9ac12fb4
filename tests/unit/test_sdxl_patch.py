"""The regional cross-attention patch (models/sdxl_patch.py) and TroupeApplySDXL's work function.

Every formula is checked against an independent computation written here (explicit softmax, box masks
built from floor/ceil by hand, K/V of the gated tokens projected directly), on a stand-in adapter built
from plain Linear layers so the patch math is tested apart from the file formats.
"""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_troupe.models.layout.grid import grid_of_tokens
from comfyui_troupe.models.layout.layout import Layout, Region
from comfyui_troupe.models.sdxl.patch import (
    RegionalAttentionPatch,
    RegionalParams,
    block_selected,
    joint_groups,
    sdpa_attention,
)

pytest_plugins = ["lifecycle_probe"]  # the runs and clones fixtures

CROSS = 2048


class StandInAdapter(torch.nn.Module):
    """The SdxlAdapter interface (models/sdxl_adapter.py) over plain Linear layers and a fixed router."""

    def __init__(self, widths: dict, *, semantics: str = "joint", tokens: int = 3, levels: int = 1,
                 image_width: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.semantics = semantics
        self.format = "ms-diffusion" if semantics == "joint" else "ip-adapter-plus-sdxl"
        self.cross_dim = CROSS
        self.tokens_per_subject = tokens
        self.num_levels = levels
        self.image_input = "penultimate"
        self.image_width = image_width
        self.needs_phrases = semantics == "joint"
        self.dummy_tokens = torch.randn(1, 4, CROSS, generator=gen) if semantics == "joint" else None
        self.proj = torch.nn.Linear(image_width, levels * tokens * CROSS, bias=False)
        self._keys = sorted(widths)
        self.k = torch.nn.ModuleList()
        self.v = torch.nn.ModuleList()
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) * 0.2)
            for key in self._keys:
                for lst in (self.k, self.v):
                    lin = torch.nn.Linear(CROSS, widths[key][1], bias=False)
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.05)
                    lst.append(lin)
        self.routed: list[float] = []

    def subject_tokens(self, image_features, boxes, phrases=None):
        x = image_features.mean(1) if image_features.ndim == 3 else image_features
        return self.proj(x).reshape(x.shape[0], self.num_levels, self.tokens_per_subject, CROSS)

    def route(self, t, mode="learned", schedule=None):
        self.routed.append(t)
        if mode == "static":
            return torch.full((self.num_levels,), 1.0 / self.num_levels)
        g = torch.tensor([math.exp(-((t - c) ** 2) / 0.09) for c in (1.0, 0.7, 0.4, 0.1)][: self.num_levels])
        return g / g.sum()

    def layer_keys(self):
        return list(self._keys)

    def kv(self, key):
        i = self._keys.index(key)
        return self.k[i], self.v[i]


HEADS, WIDTH = 2, 16
KEY = ("input", 4, 0)


def options(latent_hw, cond_or_uncond=(0,), sigma=1.0):
    return {"n_heads": HEADS, "dim_head": WIDTH // HEADS, "block": KEY[:2], "block_index": KEY[2],
            "original_shape": [len(cond_or_uncond), 4, *latent_hw], "cond_or_uncond": list(cond_or_uncond),
            "sigmas": torch.tensor([sigma] * len(cond_or_uncond))}


def softmax_attention(q, k, v, heads, bias=None):
    """Independent multi-head attention with an explicit softmax; bias [P, L] is added to the logits."""
    b, p, c = q.shape
    d = c // heads
    qh = q.reshape(b, p, heads, d).permute(0, 2, 1, 3)
    kh = k.reshape(k.shape[0], -1, heads, d).permute(0, 2, 1, 3)
    vh = v.reshape(v.shape[0], -1, heads, d).permute(0, 2, 1, 3)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    return probs, vh


def merge(x):
    b, h, p, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, p, h * d)


def floor_ceil_mask(box, h, w):
    """MS-Diffusion's box -> grid rule written directly: rows floor(y0*h)..ceil(y1*h), same for columns."""
    x0, y0, x1, y1 = box
    m = torch.zeros(h, w)
    m[math.floor(y0 * h):math.ceil(y1 * h), math.floor(x0 * w):math.ceil(x1 * w)] = 1
    return m.flatten()


# --------------------------------------------------------------------------- helpers


def test_token_grid_uses_ceil_halving_for_any_aspect():
    assert grid_of_tokens(13 * 20, 13, 20) == (13, 20)
    assert grid_of_tokens(7 * 10, 13, 20) == (7, 10)
    assert grid_of_tokens(4 * 5, 13, 20) == (4, 5)
    with pytest.raises(ValueError, match="match no downscale"):
        grid_of_tokens(17, 13, 20)


def test_blocks_default_is_down_and_mid():
    assert block_selected(("input", 4, 0), "down+mid") and block_selected(("middle", 0, 0), "down+mid")
    assert not block_selected(("output", 0, 0), "down+mid")
    assert all(block_selected(k, "all") for k in [("input", 7, 1), ("middle", 0, 0), ("output", 5, 0)])
    assert block_selected(("output", 3, 0), "up") and not block_selected(("input", 4, 0), "up")


# --------------------------------------------------------------------------- exact semantics


def test_joint_equals_ms_diffusion_masked_attention_non_square_overlapping():
    """Joint semantics against MS-Diffusion's masked attention (dummy tokens, -10000 bias, background zeroing,
    per-subject scales on the probabilities, out = text + scale * ip), 6x10 grid, overlapping boxes, 2 levels."""
    torch.manual_seed(0)
    widths = {KEY: (CROSS, WIDTH)}
    adapter = StandInAdapter(widths, semantics="joint", tokens=3, levels=2)
    boxes = [(0.05, 0.1, 0.55, 0.7), (0.4, 0.35, 0.95, 0.9)]  # overlap, edges off the grid lines
    layout = Layout(160, 96, tuple(Region(box=b) for b in boxes))
    feats = torch.randn(2, 5, 16)
    tokens = adapter.subject_tokens(feats, torch.tensor(boxes))
    # "times weight": the global scale and the subject scales both (MS-Diffusion files by default drop the global
    # scale when subject scales are given, as MaskedIPAttnProcessor2_0; test_golden_ms_diffusion checks that)
    params = RegionalParams(weight=0.6, subject_weights=(1.0, 1.7), subject_scale="times weight")
    t_of_sigma = lambda s: 0.3
    patch = RegionalAttentionPatch(adapter, tokens, layout, params, sigma_to_t=t_of_sigma)
    h, w = 6, 10
    q = torch.randn(2, h * w, WIDTH)
    k, v = torch.randn(2, 77, WIDTH), torch.randn(2, 77, WIDTH)
    got = patch.attn2(q, k, v, options((12, 20), cond_or_uncond=(0, 0), sigma=2.0))

    # independent: gated tokens Concat_l(w_l T_l) (Eq. 6 of 000), projected with to_k_ip / to_v_ip
    gates = adapter.route(0.3)
    gated = torch.cat([gates[i] * tokens[:, i] for i in range(2)], dim=1)  # [N, 2T, D]
    to_k, to_v = adapter.kv(KEY)
    keys = torch.cat([adapter.dummy_tokens[0], gated.flatten(0, 1)]) @ to_k.weight.t()
    vals = torch.cat([adapter.dummy_tokens[0], gated.flatten(0, 1)]) @ to_v.weight.t()
    m = torch.stack([floor_ceil_mask(b, h, w) for b in boxes])  # [N, P]
    dummy_ok = (1 - m).clamp(min=0).prod(0)  # 1 where no box covers
    bias = torch.cat([((1 - dummy_ok) * -10000.0)[:, None].expand(-1, 4),
                      ((1 - m) * -10000.0).t().repeat_interleave(6, dim=1)], dim=1)
    text_p, text_v = softmax_attention(q, k, v, HEADS)
    ip_p, ip_v = softmax_attention(q, keys[None].expand(2, -1, -1), vals[None].expand(2, -1, -1), HEADS, bias)
    ip_p = torch.where(dummy_ok.bool()[None, None, :, None], torch.zeros_like(ip_p), ip_p)
    scales = torch.cat([torch.ones(4), torch.tensor([1.0, 1.7]).repeat_interleave(6)])
    expected = merge(text_p @ text_v) + 0.6 * merge((ip_p * scales) @ ip_v)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # the test can fail: background really is text-only and boxes really attend to the subjects
    text_only = merge(text_p @ text_v)
    assert torch.allclose(got[:, dummy_ok.bool()], text_only[:, dummy_ok.bool()], atol=1e-6)
    assert (got - text_only)[:, ~dummy_ok.bool()].abs().amin(-1).max() > 0


def test_separate_one_subject_full_canvas_equals_ip_adapter():
    """IP-Adapter's decoupled cross-attention: out = text + lambda * Attn(Q, K_ip, V_ip), full-canvas mask."""
    torch.manual_seed(1)
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)}, semantics="separate", tokens=4)
    layout = Layout(64, 64, (Region(box=(0.0, 0.0, 1.0, 1.0)),))
    tokens = adapter.subject_tokens(torch.randn(1, 5, 16), None)
    patch = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(weight=0.8, subject_weights=(1.25,)))
    q, k, v = torch.randn(1, 64, WIDTH), torch.randn(1, 77, WIDTH), torch.randn(1, 77, WIDTH)
    got = patch.attn2(q, k, v, options((8, 8)))
    to_k, to_v = adapter.kv(KEY)
    kk, vv = tokens[0, 0] @ to_k.weight.t(), tokens[0, 0] @ to_v.weight.t()
    tp, tv = softmax_attention(q, k, v, HEADS)
    ip, iv = softmax_attention(q, kk[None], vv[None], HEADS)
    expected = merge(tp @ tv) + 0.8 * 1.25 * merge(ip @ iv)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_separate_sums_masked_terms_per_subject():
    """out = text + sum_i lambda_i * M_i * Attn(Q, K_i, V_i), coverage masks on a 5x7 grid."""
    torch.manual_seed(2)
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)}, semantics="separate", tokens=4)
    boxes = [(0.0, 0.0, 0.5, 0.6), (0.3, 0.3, 1.0, 1.0)]
    layout = Layout(56, 40, tuple(Region(box=b) for b in boxes))
    tokens = adapter.subject_tokens(torch.randn(2, 5, 16), None)
    patch = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(weight=1.0, subject_weights=(0.5, 2.0)))
    q, k, v = torch.randn(1, 35, WIDTH), torch.randn(1, 77, WIDTH), torch.randn(1, 77, WIDTH)
    got = patch.attn2(q, k, v, options((5, 7)))
    to_k, to_v = adapter.kv(KEY)
    tp, tv = softmax_attention(q, k, v, HEADS)
    expected = merge(tp @ tv)
    def coverage(lo, hi, n):  # the fraction of each of n cells inside [lo, hi] (normalised)
        cells = torch.arange(n, dtype=torch.float64)
        return (torch.clamp(torch.tensor(hi * n) - cells, 0, 1) - torch.clamp(torch.tensor(lo * n) - cells, 0, 1)).float()

    for i, (lam, b) in enumerate(zip((0.5, 2.0), boxes)):
        x0, y0, x1, y1 = b
        mask = (coverage(y0, y1, 5)[:, None] * coverage(x0, x1, 7)[None]).flatten()
        kk, vv = tokens[i, 0] @ to_k.weight.t(), tokens[i, 0] @ to_v.weight.t()
        ip, iv = softmax_attention(q, kk[None], vv[None], HEADS)
        expected = expected + lam * mask[None, :, None] * merge(ip @ iv)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_joint_groups_split_pixels_by_covering_regions():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    groups = joint_groups(masks, tokens_per_subject=2)
    as_lists = sorted((p.tolist(), t.tolist()) for p, t in groups)
    assert as_lists == [([0], [0, 1]), ([1], [0, 1, 2, 3]), ([2], [2, 3])]  # pixel 3: background, no group


# --------------------------------------------------------------------------- batching, branches, range


@pytest.mark.parametrize("semantics", ["joint", "separate"])
def test_cond_uncond_in_any_order_and_batch(semantics):
    """Rows are split by cond_or_uncond chunks; joint uncond gets no image attention (zero boxes), separate
    uncond gets the uncond tokens; the result does not depend on the chunk order."""
    torch.manual_seed(3)
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)}, semantics=semantics)
    layout = Layout(64, 64, (Region(box=(0.0, 0.0, 0.5, 1.0)), Region(box=(0.5, 0.0, 1.0, 1.0))))
    tokens = adapter.subject_tokens(torch.randn(2, 5, 16), None)
    uncond = adapter.subject_tokens(torch.ones(2, 5, 16), None) if semantics == "separate" else None
    patch = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(), uncond_tokens=uncond)
    qc, qu = torch.randn(2, 64, WIDTH), torch.randn(2, 64, WIDTH)
    kc, ku = torch.randn(2, 77, WIDTH), torch.randn(2, 77, WIDTH)
    a = patch.attn2(torch.cat([qc, qu]), torch.cat([kc, ku]), torch.cat([kc, ku]), options((8, 8), (0, 1)))
    b = patch.attn2(torch.cat([qu, qc]), torch.cat([ku, kc]), torch.cat([ku, kc]), options((8, 8), (1, 0)))
    assert torch.allclose(a[:2], b[2:], atol=1e-6) and torch.allclose(a[2:], b[:2], atol=1e-6)
    text_u = sdpa_attention(qu, ku, ku, HEADS)
    text_c = sdpa_attention(qc, kc, kc, HEADS)
    assert not torch.allclose(a[:2], text_c, atol=1e-4)
    if semantics == "joint":
        assert torch.allclose(a[2:], text_u, atol=1e-6)
    else:
        assert not torch.allclose(a[2:], text_u, atol=1e-4)
    # batch items are independent: item 1 alone gives the same rows
    single = patch.attn2(qc[1:], kc[1:], kc[1:], options((8, 8), (0,)))
    assert torch.allclose(single, a[1:2], atol=1e-6)


def test_outside_the_sigma_range_is_text_only():
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)})
    layout = Layout(64, 64, (Region(box=(0.0, 0.0, 1.0, 1.0)),))
    tokens = adapter.subject_tokens(torch.randn(1, 5, 16), None)
    patch = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(sigma_start=5.0, sigma_end=1.0))
    q, k = torch.randn(1, 64, WIDTH), torch.randn(1, 77, WIDTH)
    text = sdpa_attention(q, k, k, HEADS)
    assert torch.allclose(patch.attn2(q, k, k, options((8, 8), sigma=7.0)), text)
    assert torch.allclose(patch.attn2(q, k, k, options((8, 8), sigma=0.5)), text)
    assert not torch.allclose(patch.attn2(q, k, k, options((8, 8), sigma=3.0)), text)


def test_refine_off_uses_the_base_level_only():
    """Without refinement the patch equals a one-level adapter fed T_base (MS-Diffusion)."""
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)}, levels=4)
    layout = Layout(64, 64, (Region(box=(0.1, 0.1, 0.9, 0.9)),))
    tokens = adapter.subject_tokens(torch.randn(1, 5, 16), None)
    off = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(refine=False))
    base = RegionalAttentionPatch(adapter, tokens[:, :1].clone(), layout, RegionalParams())
    q, k = torch.randn(1, 64, WIDTH), torch.randn(1, 77, WIDTH)
    assert torch.allclose(off.attn2(q, k, k, options((8, 8))), base.attn2(q, k, k, options((8, 8))), atol=1e-6)
    assert not adapter.routed  # one level: no router call


def test_attention_backends_agree():
    """ComfyUI's attention functions (basic, pytorch SDPA, sub-quadratic, split) take the additive mask alike."""
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    import comfy.ldm.modules.attention as att

    torch.manual_seed(4)
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)})
    layout = Layout(80, 48, (Region(box=(0.0, 0.0, 0.6, 0.7)), Region(box=(0.3, 0.2, 1.0, 1.0))))
    tokens = adapter.subject_tokens(torch.randn(2, 5, 16), None)
    q, k = torch.randn(2, 60, WIDTH), torch.randn(2, 77, WIDTH)
    ref = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams()).attn2(q, k, k, options((6, 10), (0, 0)))
    for fn in (att.attention_basic, att.attention_pytorch, att.attention_sub_quad, att.attention_split):
        got = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(), attention=fn).attn2(
            q, k, k, options((6, 10), (0, 0)))
        assert torch.allclose(got, ref, atol=1e-5), (fn.__name__, (got - ref).abs().max())


def test_cache_is_built_once_per_run_and_kept_only_in_the_run():
    """K/V once per run (the run dict the host hands in), the router once per step; the patch keeps nothing."""
    adapter = StandInAdapter({KEY: (CROSS, WIDTH)}, levels=4)
    layout = Layout(64, 64, (Region(box=(0.1, 0.1, 0.9, 0.9)),))
    tokens = adapter.subject_tokens(torch.randn(1, 5, 16), None)
    patch = RegionalAttentionPatch(adapter, tokens, layout, RegionalParams(), sigma_to_t=lambda s: s / 10)
    calls = []
    orig = adapter.kv
    adapter.kv = lambda key: calls.append(key) or orig(key)
    attributes = dict(vars(patch))
    q, k = torch.randn(1, 64, WIDTH), torch.randn(1, 77, WIDTH)
    run: dict = {}
    for sigma in (9.0, 5.0, 1.0):
        for _ in range(2):
            patch.attn2(q, k, k, options((8, 8), sigma=sigma), run)
    assert calls == [KEY]  # projections once per run, not per step or call
    assert adapter.routed == pytest.approx([0.9, 0.5, 0.1])  # the router once per step
    assert run and vars(patch) == attributes  # everything went in the run's dict, nothing into the patch
    patch.attn2(q, k, k, options((8, 8), sigma=1.0))  # a call outside a run: computed afresh, nothing kept
    assert calls == [KEY, KEY] and vars(patch) == attributes


# --------------------------------------------------------------------------- on the tiny SDXL UNet (ComfyUI)


def _features(n: int, width: int = 16, seed: int = 5):
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures

    gen = torch.Generator().manual_seed(seed)
    return ClipFeatures(hidden=torch.randn(n, 3, 5, width, generator=gen), layers=(10, 17, 23), encoder="stand-in",
                        labels=tuple(f"subject{i}" for i in range(n)), depth=24)


@pytest.fixture(scope="module")
def unet():
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    from fixtures.tiny_models import sdxl_conditioning, tiny_sdxl

    from comfyui_troupe.nodes import sdxl as node

    base = tiny_sdxl(0)
    widths = node.attention_widths(base)
    return node, base, widths, sdxl_conditioning


def _apply(unet, *, semantics="joint", levels=1, params=None, layout=None, n=2, **kw):
    from comfyui_troupe.models.adapter_file import Adapter

    node, base, widths, _ = unet
    module = StandInAdapter(widths, semantics=semantics, levels=levels, seed=7)
    module.needs_phrases = False  # no CLIP here; label embeddings are tested in the server workflow
    layout = layout or Layout(160, 96, (Region(box=(0.0, 0.1, 0.6, 0.9)), Region(box=(0.45, 0.0, 1.0, 0.7))))
    model = node.apply_sdxl(base, Adapter("sdxl", module.format, module), _features(n), layout,
                            params or RegionalParams(weight=1.0), None, **kw)
    return model, module


def _patches(model) -> dict:
    """The regional patch at every attn2 key of a model (behind its lifecycle hooks)."""
    table = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    return {key: hook.patch for key, hook in table.items()}


def _sample(model, cond, cfg=3.0, steps=3, callback=None):
    import comfy.sample

    latent = torch.zeros(1, 4, 12, 20)
    noise = comfy.sample.prepare_noise(latent, 0)
    pos, neg = cond(1, width=160, height=96), cond(2, width=160, height=96)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=0,
                                   disable_pbar=True, callback=callback)


def test_tiny_unet_layers_match_the_fixture_numbers(unet):
    _, _, widths, _ = unet
    assert sorted(widths) == sorted([("input", 4, 0), ("input", 5, 0), ("input", 7, 0), ("input", 8, 0),
                                     ("middle", 0, 0)] + [("output", i, 0) for i in range(6)])
    assert {k: w[1] for k, w in widths.items() if w[1] == 64} == {
        ("input", 4, 0): 64, ("input", 5, 0): 64, ("output", 3, 0): 64, ("output", 4, 0): 64, ("output", 5, 0): 64}
    assert all(w[0] == 2048 for w in widths.values())


def test_patches_a_clone_in_the_chosen_blocks_including_middle(unet):
    model, _ = _apply(unet, params=RegionalParams(blocks="down+mid"))
    assert sorted(_patches(model)) == sorted([("input", 4, 0), ("input", 5, 0), ("input", 7, 0), ("input", 8, 0),
                                              ("middle", 0, 0)])
    model_all, _ = _apply(unet)  # default: every layer the file has weights for, as MS-Diffusion was trained
    assert len(_patches(model_all)) == 11 and ("middle", 0, 0) in _patches(model_all)
    assert not _patches(unet[1])


def test_base_model_unchanged_after_apply_and_sampling(unet, runs):
    """The MODEL passed in keeps its options, wrappers and outputs; the patched clone really differs."""
    import copy

    _node, base, _, cond = unet
    options_before = copy.deepcopy(base.model_options)
    wrappers_before = {k: dict(v) for k, v in base.wrappers.items()}
    before = _sample(base, cond)
    model, _ = _apply(unet, semantics="joint", levels=4, params=RegionalParams(weight=1.0, blocks="all"))
    patched = _sample(model, cond)
    assert len(runs.states) == 1 and runs.states[0].held and not runs.leftover()  # the run's cache, freed at its end
    after = _sample(base, cond)
    assert base.model_options == options_before
    assert {k: dict(v) for k, v in base.wrappers.items()} == wrappers_before
    assert torch.equal(before, after)
    assert (patched - before).abs().max() > 1e-4


def test_routing_reads_each_steps_sigma(unet):
    """The gate of each step comes from t = model_sampling.timestep(sigma) / 1000 of that step's sigma."""
    import comfy.samplers

    model, module = _apply(unet, levels=4, params=RegionalParams(routing="learned"))
    assert module.routed == [0.5]  # the node checks the routing once before sampling
    module.routed.clear()
    _sample(model, unet[3], steps=4)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 4)[:-1]
    expected = [float(sampling.timestep(s[None])[0]) / 1000 for s in sigmas]
    assert module.routed == pytest.approx(expected, abs=1e-5)
    assert expected[0] > 0.9 and expected[-1] < 0.5


def test_start_end_percent_bound_the_steps(unet):
    model, module = _apply(unet, levels=4, start_percent=0.5, end_percent=1.0)
    module.routed.clear()
    _sample(model, unet[3], steps=4)
    assert 0 < len(module.routed) < 4  # only the later steps ran the image attention
    assert max(module.routed) < 0.75


@pytest.mark.parametrize("semantics", ["joint", "separate"])
def test_locality_at_every_patched_resolution(unet, semantics):
    """Raising subject 1's weight changes the attention output only inside region 1, at every patched layer,
    for the real q/k/v of a tiny-UNet step on a non-square latent."""
    layout = Layout(160, 96, (Region(box=(0.05, 0.1, 0.5, 0.8)), Region(box=(0.55, 0.2, 0.95, 0.95))))
    model, module = _apply(unet, semantics=semantics, params=RegionalParams(blocks="all"), layout=layout)
    patch = next(iter(_patches(model).values()))
    calls = []
    def recorder(q, k, v, eo):
        calls.append((q.clone(), k.clone(), v.clone(), dict(eo)))
        return patch.attn2(q, k, v, eo)

    for key in list(_patches(model)):
        model.set_model_attn2_replace(recorder, *key)
    _sample(model, unet[3], cfg=1.0, steps=1)
    grids = set()
    for q, k, v, eo in calls:
        lo = RegionalAttentionPatch(module, patch.tokens, layout, RegionalParams(subject_weights=(1.0, 1.0)))
        hi = RegionalAttentionPatch(module, patch.tokens, layout, RegionalParams(subject_weights=(3.0, 1.0)))
        diff = (hi.attn2(q, k, v, eo) - lo.attn2(q, k, v, eo)).abs().amax(-1)  # [B, P]
        h, w = grid_of_tokens(q.shape[1], 12, 20)
        grids.add((h, w))
        inside = layout.masks(h, w, edge="binary" if semantics == "joint" else "coverage")[0].flatten() > 0
        assert diff[:, ~inside].max() == 0, eo["block"]
        assert diff[:, inside].amin() > 0, eo["block"]
    assert grids == {(6, 10), (3, 5)}
    assert len(calls) == 11


def test_label_embedding_is_clip_l_unprojected_pooled_output(unet):
    """MS-Diffusion's phrase embedding: CLIP-L's final-layer-normed hidden state at the end-of-text token,
    before text_projection (the SDXL CLIP's clip_l, ComfyUI tokenizer)."""
    import importlib.util
    from pathlib import Path

    node = unet[0]
    path = Path(__file__).resolve().parents[1] / "custom_nodes" / "troupe_test_nodes" / "clip_nodes.py"
    spec = importlib.util.spec_from_file_location("troupe_test_clip_nodes", path)
    clip_nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip_nodes)
    clip = clip_nodes.tiny_sdxl_clip(seed=1, width_l=24, width_g=16)
    labels = ("dog", "teddy bear")
    got = node.phrase_embeddings(clip, labels)
    assert got.shape == (2, 24)
    clip_l = clip.cond_stage_model.clip_l
    seen = []
    handle = clip_l.transformer.text_model.final_layer_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        for i, label in enumerate(labels):
            seen.clear()
            tokens = [t for t, _ in clip.tokenize(label)["l"][0]]
            with torch.inference_mode():
                clip_l.encode_token_weights(clip.tokenize(label)["l"])
            eos = tokens.index(49407)
            assert torch.allclose(got[i], seen[-1][0, eos].float(), atol=1e-6)
            projected = seen[-1][0, eos].float() @ clip_l.transformer.text_projection.weight.t().float()
            assert not torch.allclose(got[i], projected, atol=1e-3)
    finally:
        handle.remove()
    assert clip_l.return_projected_pooled  # the options were reset for the next user


def _tiny_clip(width_l: int):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "custom_nodes" / "troupe_test_nodes" / "clip_nodes.py"
    spec = importlib.util.spec_from_file_location("troupe_test_clip_nodes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_sdxl_clip(seed=2, width_l=width_l, width_g=16)


@pytest.mark.parametrize("routing,schedule", [("learned", None), ("static", None),
                                              ("manual", "1.0: 1,0,0,0; 0.0: 0,0,0,1")])
def test_real_r3_file_gates_at_several_sigmas(unet, routing, schedule):
    """An R^3 file (published MS-Diffusion keys + refiner + router) loaded by the family, applied to the tiny UNet:
    at several sigmas the patch's gates are the router's w(t) at t = timestep(sigma) / 1000 (Eqs. 5-6 of 000)."""
    from fixtures.sdxl_adapters import r3_state_dict

    from comfyui_troupe.models.adapter_file import detect_and_load
    from comfyui_troupe.models.sdxl.formats import FAMILY

    node, base, _, cond = unet
    adapter = detect_and_load(r3_state_dict(1, phrase_dim=24), [FAMILY], "r3.safetensors")
    features = _features(2, width=64)
    layout = Layout(160, 96, (Region(box=(0.0, 0.1, 0.6, 0.9)), Region(box=(0.45, 0.0, 1.0, 0.7))))
    model = node.apply_sdxl(base, adapter, features, layout,
                            RegionalParams(weight=0.7, routing=routing, schedule=schedule, blocks="all"),
                            _tiny_clip(24))
    patch = next(iter(_patches(model).values()))
    sampling = model.get_model_object("model_sampling")
    assert patch.tokens.shape == (2, 4, adapter.module.tokens_per_subject, 2048)
    for sigma in (14.6, 5.0, 1.0, 0.1):
        t = float(sampling.timestep(torch.tensor([sigma]))[0]) / 1000
        want = adapter.module.route(t, mode=routing, schedule=schedule)
        assert torch.allclose(patch.gates(sigma), want, atol=1e-6), (sigma, t)
    if routing == "manual":  # linear in t between the entries
        assert torch.allclose(patch.gates(14.6)[[0, 3]], torch.tensor([t14 := float(sampling.timestep(
            torch.tensor([14.6]))[0]) / 1000, 1 - t14]), atol=1e-6)
    out = _sample(model, cond, steps=2)
    assert torch.isfinite(out).all()


def test_chained_on_an_earlier_attn2_patch(unet):
    """Applied on a model that already has attn2 replaces (another adapter), the earlier patch still gives the
    text term and the regional term is added on top; applying twice adds both subjects' terms."""
    once, module = _apply(unet, params=RegionalParams(blocks="all"))
    node = unet[0]
    from comfyui_troupe.models.adapter_file import Adapter

    twice = node.apply_sdxl(once, Adapter("sdxl", module.format, module), _features(2), Layout(
        160, 96, (Region(box=(0.0, 0.0, 0.5, 0.5)), Region(box=(0.5, 0.5, 1.0, 1.0)))), RegionalParams(blocks="all"))
    table = lambda m: m.model_options["transformer_options"]["patches_replace"]["attn2"]
    first, second = table(once)[("input", 4, 0)], table(twice)[("input", 4, 0)]
    assert second.patch is not first.patch and second.previous is first and second.key != first.key
    q, k = torch.randn(1, 60, 64), torch.randn(1, 77, 64)
    eo = {"n_heads": 8, "dim_head": 8, "block": ("input", 4), "block_index": 0, "original_shape": [1, 4, 12, 20],
          "cond_or_uncond": [0], "sigmas": torch.tensor([1.0])}
    text = sdpa_attention(q, k, k, 8)
    added = second(q, k, k, eo) - text
    regional = second.patch.image_attention(q, ("input", 4, 0), 6, 10, 1.0, 8)
    # a tolerance: comfy's attention backend and the plain SDPA reference sum in different orders
    assert torch.allclose(added, (first(q, k, k, eo) - text) + regional, atol=1e-5)


def test_separate_uncond_is_ip_adapters_unconditional_image_prompt(unet):
    """IP-Adapter Plus files: the uncond branch's tokens come from the encoded all-zero image recorded by
    TroupeEncodeSubjects; without it (or for embeds files), from zero features."""
    import dataclasses

    from comfyui_troupe.models.adapter_file import Adapter

    node, base, widths, _ = unet
    module = StandInAdapter(widths, semantics="separate", seed=9)
    layout = Layout(64, 64, (Region(box=(0.0, 0.0, 0.5, 1.0)), Region(box=(0.5, 0.0, 1.0, 1.0))))
    features = _features(2, width=16)
    encoded_zero = torch.randn(1, 5, 16)
    with_zero = dataclasses.replace(features, penultimate=features.layer(23), uncond_penultimate=encoded_zero)
    for feats, want in ((with_zero, encoded_zero.expand(2, -1, -1)), (features, torch.zeros(2, 5, 16))):
        model = node.apply_sdxl(base, Adapter("sdxl", module.format, module), feats, layout, RegionalParams())
        patch = next(iter(_patches(model).values()))
        assert torch.allclose(patch.uncond_tokens, module.subject_tokens(want, None))
        assert torch.allclose(patch.tokens, module.subject_tokens(features.layer(23), None))
