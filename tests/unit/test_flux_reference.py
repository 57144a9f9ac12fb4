"""The FLUX reference branch (models/reference/) on the tiny FLUX fixture (ComfyUI's Flux, in-process).

What the issue asks: no references = the base model exactly; text and noisy-image tokens never use the
LoRA; references never attend to each other; reference RoPE positions never coincide with the image's;
nothing leaks between runs or clones; an existing replace patch keeps working (composition).
"""
from __future__ import annotations

import pytest
import torch
from fixtures import tiny_models as tm
from fixtures.reference_loras import mosaic_lora_state_dict, zero_lora
from lifecycle_probe import fingerprint, sample

from comfyui_troupe.models.reference import blocks as fb
from comfyui_troupe.models.reference import hooks as fh

pytest_plugins = ["lifecycle_probe"]  # the runs and clones fixtures


@pytest.fixture(scope="module")
def comfy():
    tm.ensure_comfy()
    import comfy.ldm.flux.math

    return comfy


@pytest.fixture(scope="module")
def fr(comfy):
    from comfyui_troupe.models.reference import branch as flux_reference

    return flux_reference


@pytest.fixture(scope="module")
def model(comfy):
    return tm.tiny_flux()


@pytest.fixture(scope="module")
def dit(model):
    return model.model.diffusion_model


def lora_for(dit, sd):
    from comfyui_troupe.models.reference.lora import FluxDims, load_reference_lora

    return load_reference_lora(sd, FluxDims.from_model(dit))


def latents(seed=0, n=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, size, size, generator=g) for _ in range(n)]


def make_branch(fr, dit, lats=None, **opts):
    kw = {k: opts.pop(k) for k in ("concept_positions", "region_masks", "lora", "subject_weights") if k in opts}
    lats = latents() if lats is None else lats
    return fr.ReferenceBranch(dit=dit, latents=lats, ref_subject=list(range(len(lats))),
                              options=fr.ReferenceOptions(**opts), **kw)


def patched(fr, comfy, model, branch):
    """A clone of ``model`` with the branch installed as TroupeReferenceBranch installs it."""
    from comfyui_troupe.nodes.reference_branch import install_branch

    return install_branch(model, branch, comfy.ldm.flux.math.attention)


def branches_of(model) -> list:
    from comfyui_troupe.nodes.reference_branch import reference_patches

    return [p.branch for p in reference_patches(model)]


# --------------------------------------------------------------------------- block-level harness


def base_inputs(dit, seed=3, n_txt=12, hw=8):
    """What Flux.forward_orig hands the first block: img, txt, vec, pe (same calls as ComfyUI)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, hw, hw, generator=g)
    ctx = torch.randn(1, n_txt, 4096, generator=g)
    y = torch.randn(1, 768, generator=g)
    t = torch.tensor([0.7])
    from comfy.ldm.flux.layers import timestep_embedding

    img, img_ids = dit.process_img(x)
    img = dit.img_in(img)
    vec = dit.time_in(timestep_embedding(t, 256)) + dit.guidance_in(timestep_embedding(torch.tensor([3.5]), 256))
    vec = vec + dit.vector_in(y)
    txt = dit.txt_in(ctx)
    txt_ids = torch.zeros(1, n_txt, 3)
    pe = dit.pe_embedder(torch.cat((txt_ids, img_ids), 1))
    return {"x": x, "y": y, "img": img, "txt": txt, "vec": vec, "pe": pe}


def make_stream(fr, comfy, branch, inp, positions=None):
    s = fh.prepare_stream(branch, inp["x"], inp["y"], comfy.ldm.flux.math.attention, item_positions=positions)
    s.n_txt = inp["txt"].shape[1]
    return s


def run_blocks(fr, comfy, dit, stream, inp, upto=None):
    """All blocks with the reference stream; returns (text+image output, reference stream) per block."""
    att = comfy.ldm.flux.math.attention
    img, txt, vec, pe = inp["img"].clone(), inp["txt"].clone(), inp["vec"], inp["pe"]
    outs = []
    for i, b in enumerate(dit.double_blocks):
        img, txt = fb.double_block(b, i, img, txt, vec, pe, None, stream, att)
        outs.append((torch.cat((txt, img), 1), stream.x))
    x = torch.cat((txt, img), 1)
    for i, b in enumerate(dit.single_blocks):
        x = fb.single_block(b, i, x, vec, pe, None, txt.shape[1], stream, att)
        outs.append((x, stream.x))
    return outs


def run_base_blocks(dit, inp):
    img, txt, vec, pe = inp["img"].clone(), inp["txt"].clone(), inp["vec"], inp["pe"]
    outs = []
    for b in dit.double_blocks:
        img, txt = b(img=img, txt=txt, vec=vec, pe=pe)
        outs.append(torch.cat((txt, img), 1))
    x = torch.cat((txt, img), 1)
    for b in dit.single_blocks:
        x = b(x, vec=vec, pe=pe)
        outs.append(x.clone())  # ComfyUI's single block adds in place
    return outs


# --------------------------------------------------------------------------- equality with the base model


def test_no_references_patched_model_equals_base_exactly(fr, comfy, model, dit):
    branch = make_branch(fr, dit, lats=[])
    m = patched(fr, comfy, model, branch)
    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    latent = torch.zeros(1, 16, 16, 16)
    for cfg in (1.0, 2.0):
        assert torch.equal(tm.sample(m, pos, neg, latent, steps=3, cfg=cfg),
                           tm.sample(model, pos, neg, latent, steps=3, cfg=cfg))


def test_references_change_the_output_and_base_model_is_untouched(fr, comfy, model, dit):
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    latent = torch.zeros(1, 16, 16, 16)
    base = tm.sample(model, pos, neg, latent, steps=3)
    m = patched(fr, comfy, model, make_branch(fr, dit))
    out = tm.sample(m, pos, neg, latent, steps=3)
    assert (out - base).abs().max() > 1e-5
    assert torch.equal(tm.sample(m, pos, neg, latent, steps=3), out)  # nothing carried between runs
    assert torch.equal(tm.sample(model, pos, neg, latent, steps=3), base)
    for k, v in dit.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert "model_function_wrapper" not in model.model_options


def test_with_references_isolated_by_the_mask_text_and_image_equal_base(fr, comfy, model, dit):
    """Selective text mask with no concept tokens + empty regions: nobody attends the references, so text and
    image tokens must be exactly what the base model computes (only what they attend to may change)."""
    empty = lambda h, w: torch.zeros(2, h, w)
    branch = make_branch(fr, dit, selective_text=True, region=True, concept_positions=[[], []], region_masks=empty)
    inp = base_inputs(dit)
    outs = run_blocks(fr, comfy, dit, make_stream(fr, comfy, branch, inp), inp)
    for (got, _ref), want in zip(outs, run_base_blocks(dit, inp)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- LoRA on reference tokens only


def test_lora_touches_only_reference_tokens(fr, comfy, dit, monkeypatch):
    """Every LoRA call sees reference rows (R tokens) or the reference modulation vector (1 row), never text/image."""
    from comfyui_troupe.models.reference.lora import ReferenceLoRA

    lora = lora_for(dit, mosaic_lora_state_dict())
    branch = make_branch(fr, dit, lora=lora)
    r = sum(lat.shape[-1] * lat.shape[-2] // 4 for lat in branch.latents)
    seen = []
    real = ReferenceLoRA.apply

    def spy(self, name, x, y, strength=1.0):
        seen.append((name, x.shape[-2]))
        return real(self, name, x, y, strength)

    monkeypatch.setattr(ReferenceLoRA, "apply", spy)
    inp = base_inputs(dit)
    run_blocks(fr, comfy, dit, make_stream(fr, comfy, branch, inp), inp)
    assert seen and {n for _, n in seen} <= {r, 1}
    assert {name for name, _ in seen} >= {"img_in", "double_blocks.1.img_attn.qkv", "single_blocks.1.linear1",
                                          "single_blocks.0.modulation.lin", "double_blocks.0.img_mlp.2"}


def test_zeroing_the_lora_changes_only_the_reference_stream(fr, comfy, dit):
    empty = lambda h, w: torch.zeros(2, h, w)
    common = {"selective_text": True, "region": True, "concept_positions": [[], []], "region_masks": empty}
    sd = mosaic_lora_state_dict()
    inp = base_inputs(dit)
    with_lora = run_blocks(fr, comfy, dit, make_stream(fr, comfy, make_branch(
        fr, dit, lora=lora_for(dit, sd), **common), inp), inp)
    zeroed = run_blocks(fr, comfy, dit, make_stream(fr, comfy, make_branch(
        fr, dit, lora=lora_for(dit, zero_lora(sd)), **common), inp), inp)
    for (a, ra), (b, rb) in zip(with_lora, zeroed):
        assert torch.equal(a, b)  # text + image rows identical
        assert (ra - rb).abs().max() > 1e-4  # the reference stream moved


def test_zero_lora_equals_no_lora(fr, comfy, dit):
    inp = base_inputs(dit)
    a = run_blocks(fr, comfy, dit, make_stream(fr, comfy, make_branch(fr, dit), inp), inp)
    b = run_blocks(fr, comfy, dit, make_stream(fr, comfy, make_branch(
        fr, dit, lora=lora_for(dit, zero_lora(mosaic_lora_state_dict()))), inp), inp)
    for (x, rx), (y, ry) in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rx, ry, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- references never see each other


@pytest.mark.parametrize("which", ["double", "single"])
def test_perturbing_reference_2_leaves_reference_1_unchanged(fr, comfy, dit, which):
    """Within every block, reference 1's output does not depend on reference 2's input (and vice versa)."""
    att = comfy.ldm.flux.math.attention
    inp = base_inputs(dit)
    lats = latents()
    branch = make_branch(fr, dit, lats=lats, lora=lora_for(dit, mosaic_lora_state_dict()))
    n1 = lats[0].shape[-1] * lats[0].shape[-2] // 4
    for index in range(2):
        outs = []
        for bump in (0.0, 3.0):
            s = make_stream(fr, comfy, branch, inp)
            s.x = s.x.clone()
            s.x[:, n1:] += bump
            if which == "double":
                fb.double_block(dit.double_blocks[index], index, inp["img"].clone(), inp["txt"].clone(), inp["vec"],
                                inp["pe"], None, s, att)
            else:
                x = torch.cat((inp["txt"], inp["img"]), 1)
                fb.single_block(dit.single_blocks[index], index, x, inp["vec"], inp["pe"], None, inp["txt"].shape[1],
                                s, att)
            outs.append(s.x)
        assert torch.equal(outs[0][:, :n1], outs[1][:, :n1])
        assert (outs[0][:, n1:] - outs[1][:, n1:]).abs().max() > 1e-3


def test_self_cached_kv_of_reference_1_ignores_reference_2(fr, comfy, dit):
    inp = base_inputs(dit)
    a, b = latents(), latents()
    b[1] = b[1] + 2.0
    n1 = a[0].shape[-1] * a[0].shape[-2] // 4
    ka = make_stream(fr, comfy, make_branch(fr, dit, lats=a, attention="self_cached"), inp).kv
    kb = make_stream(fr, comfy, make_branch(fr, dit, lats=b, attention="self_cached"), inp).kv
    assert set(ka) == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    for key in ka:
        torch.testing.assert_close(ka[key][0][:, :, :n1], kb[key][0][:, :, :n1], atol=1e-6, rtol=0)
        assert (ka[key][1][:, :, n1:] - kb[key][1][:, :, n1:]).abs().max() > 1e-4


def test_self_cached_kv_are_computed_once_per_run(fr, comfy, model, dit, monkeypatch, runs):
    calls = []
    real = fh.self_cached_kv
    monkeypatch.setattr(fh, "self_cached_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = patched(fr, comfy, model, make_branch(fr, dit, attention="self_cached"))
    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    tm.sample(m, pos, neg, torch.zeros(1, 16, 16, 16), steps=4, cfg=1.0)
    assert len(calls) == 1
    assert runs.states[0].held and not runs.leftover()  # K/V released when sampling ended
    tm.sample(m, pos, neg, torch.zeros(1, 16, 16, 16), steps=4, cfg=2.0)  # a new run: cond + uncond in one batch
    assert len(calls) == 2


# --------------------------------------------------------------------------- positions


@pytest.mark.parametrize("grids,img", [([(4, 4), (4, 4)], (8, 8)), ([(32, 32)] * 4, (64, 64)),
                                       ([(3, 5), (6, 2), (4, 4)], (5, 9))])
def test_reference_positions_never_coincide_with_the_image_or_each_other(fr, grids, img):
    refs = fr.reference_positions(grids)
    image = fr.image_positions(img)
    seen = {tuple(p.tolist()) for p in image}
    assert len(seen) == img[0] * img[1]
    for ids, (h, w) in zip(refs, grids):
        assert ids.shape == (h * w, 3)
        here = {tuple(p.tolist()) for p in ids}
        assert len(here) == h * w and not (here & seen)
        seen |= here
    # MOSAIC's layout for equal 512-px references: reference i shifted left by (i + 1) * 32 columns
    if grids[0] == (32, 32):
        for i, ids in enumerate(refs):
            assert ids[:, 2].min().item() == -(i + 1) * 32 and ids[:, 1].max().item() == 31


def test_stream_rope_table_is_built_from_the_shifted_positions(fr, comfy, dit):
    branch = make_branch(fr, dit)
    inp = base_inputs(dit)
    s = make_stream(fr, comfy, branch, inp)
    ids = torch.cat(fr.reference_positions(branch.grids()), 0)[None]
    assert torch.equal(s.pe, dit.pe_embedder(ids))


def test_reference_vec_uses_its_own_timestep(fr, comfy, dit):
    """vec_ref = time_in(emb(t_ref)) + guidance_in(emb(g_ref)) + vector_in(y), computed independently here."""
    from comfy.ldm.flux.layers import timestep_embedding

    y = torch.randn(2, 768)
    opts = fr.ReferenceOptions(timestep=0.0, guidance=1.0)
    got = fb.reference_vec(dit, y, 2, opts, torch.float32, "cpu")
    want = (dit.time_in(timestep_embedding(torch.zeros(2), 256)) + dit.guidance_in(timestep_embedding(torch.ones(2), 256))
            + dit.vector_in(y))
    torch.testing.assert_close(got, want)
    assert torch.equal(fr.timestep_embedding(torch.tensor([0.3, 0.0])), timestep_embedding(torch.tensor([0.3, 0.0]), 256))


def test_patchify_matches_comfyui_process_img(fr, dit):
    x = torch.randn(2, 16, 10, 6)
    img, _ = dit.process_img(x)
    assert torch.equal(fr.patchify(x), img)


# --------------------------------------------------------------------------- clones, interruption, composition


def test_clones_do_not_share_reference_state(fr, comfy, model, dit, clones, runs):
    """A clone shares the branch (read-only data and the DiT, never copied) but no state: nothing the two share
    changes during or after a run (the run's K/V live in its own state), each run gets its own state, and the
    clone and the original give what a fresh model gives. Under the host's clone and ComfyUI >= 0.33's."""
    fresh = sample(patched(fr, comfy, model, make_branch(fr, dit, attention="self_cached")), *conditions())
    m = patched(fr, comfy, model, make_branch(fr, dit, attention="self_cached"))
    c = m.clone()
    assert branches_of(c) == branches_of(m) and branches_of(c)[0].dit is dit
    before = fingerprint(m)
    during = []
    runs.clear()
    outs = [sample(x, *conditions(), callback=lambda *_, x=x: during.append(fingerprint(x))) for x in (m, c, m)]
    assert during and all(f == before for f in during) and fingerprint(c) == before
    assert len({id(s) for s in runs.states}) == 3 and all(s.held for s in runs.states) and not runs.leftover()
    assert all(torch.equal(o, fresh) for o in outs)


def conditions():
    return tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16), torch.zeros(1, 16, 16, 16)


def test_an_interrupted_run_leaves_the_model_clean(fr, comfy, model, dit, runs):
    class Boom(Exception):
        pass

    def explode(args, extra):
        raise Boom()

    pre = model.clone()
    pre.set_model_patch_replace(explode, "dit", "single_block", 1)
    m = patched(fr, comfy, pre, make_branch(fr, dit))
    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    with pytest.raises(Boom):
        tm.sample(m, pos, neg, torch.zeros(1, 16, 16, 16), steps=2)
    assert fr.STATE_KEY not in m.model_options.get("transformer_options", {})
    assert runs.states[0].held and not runs.leftover()  # the run scope released the run's cache
    good = patched(fr, comfy, model, make_branch(fr, dit))
    again = patched(fr, comfy, model, make_branch(fr, dit))
    assert torch.equal(tm.sample(good, pos, neg, torch.zeros(1, 16, 16, 16), steps=2),
                       tm.sample(again, pos, neg, torch.zeros(1, 16, 16, 16), steps=2))


def test_an_existing_replace_patch_is_wrapped_not_dropped(fr, comfy, model, dit):
    """Another node's patch at ("double_block", 0) (e.g. the FLUX adapter) still acts, with or without references."""
    calls = []

    def other(args, extra):
        calls.append(args["img"].shape[1])
        out = extra["original_block"](args)
        ramp = torch.linspace(-1.0, 1.0, out["img"].shape[-1])  # not a constant: LayerNorm would erase that
        return {"img": out["img"] + ramp, "txt": out["txt"]}

    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    latent = torch.zeros(1, 16, 16, 16)
    only_other = model.clone()
    only_other.set_model_patch_replace(other, "dit", "double_block", 0)
    a = tm.sample(only_other, pos, neg, latent, steps=2)
    both = patched(fr, comfy, only_other, make_branch(fr, dit, lats=[]))
    assert torch.equal(tm.sample(both, pos, neg, latent, steps=2), a)  # no references: exactly the other patch
    both_refs = patched(fr, comfy, only_other, make_branch(fr, dit))
    calls.clear()
    out = tm.sample(both_refs, pos, neg, latent, steps=2)
    assert calls and all(n == 64 for n in calls)  # the other patch saw the noisy image tokens only
    plain_refs = patched(fr, comfy, model, make_branch(fr, dit))
    assert (out - tm.sample(plain_refs, pos, neg, latent, steps=2)).abs().max() > 1e-4


# --------------------------------------------------------------------------- S* and the DEM in the sampler path


def test_dem_inserts_updated_s_star_and_drops_redux_tokens_in_the_sampler(fr, comfy, model, dit):
    """With DEM weights the context the blocks see is [T5 tokens with S*' before each label] (Redux tokens
    removed), computed once per run; the selective mask lets S* and the label tokens see their reference."""
    from comfyui_troupe.models.reference.dem import REDUX_TOKENS, Alignment, DeviationExtractionModule, insert_positions

    torch.manual_seed(0)
    dem = DeviationExtractionModule(dim=4096, redux_dim=4096, heads=2, mlp_ratio=64 / 4096, inner=64).eval()
    with torch.no_grad():
        for p in dem.parameters():
            p.normal_(0, 0.05)
    labels, n_t5 = [[2, 3], [5]], 16
    align = Alignment(dem, labels, n_t5)
    calls = []
    real = align.compute
    align.compute = lambda *a: calls.append(1) or real(*a)
    seen = []

    def spy(args, extra):
        seen.append(args["txt"].shape[1])
        return extra["original_block"](args)

    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, n_t5 + 2 * REDUX_TOKENS, 4096, generator=g)
    pos = [[ctx, {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    neg = tm.flux_conditioning(1, tokens=16)
    outs = []
    for with_dem in (True, False):
        m = model.clone()
        m.set_model_patch_replace(spy, "dit", "double_block", 0)
        branch = make_branch(fr, dit, selective_text=True, concept_positions=labels)
        branch.dem = align if with_dem else None
        m = patched(fr, comfy, m, branch)
        seen.clear()
        outs.append(tm.sample(m, pos, neg, torch.zeros(1, 16, 16, 16), steps=3, cfg=1.0))
        assert set(seen) == ({n_t5 + 2} if with_dem else {n_t5 + 2 * REDUX_TOKENS})
    assert len(calls) == 1  # once per run, not per step
    assert (outs[0] - outs[1]).abs().max() > 1e-5
    star, concept = insert_positions(labels)
    stream_positions = align.apply(ctx, [True])[1][0]
    assert stream_positions == concept and star == [2, 6]


@pytest.mark.parametrize("mode", ["joint", "self_cached"])
def test_unmasked_split_attention_equals_the_masked_joint_call(fr, comfy, dit, mode):
    """Without selective / region / weights the references are separated by one call per reference instead
    of an L x L mask; a zero additive mask from another patch forces the masked joint call: same result."""
    inp = base_inputs(dit)
    branch = make_branch(fr, dit, attention=mode, lora=lora_for(dit, mosaic_lora_state_dict()))
    att = comfy.ldm.flux.math.attention
    n = inp["txt"].shape[1] + inp["img"].shape[1]
    for forced in (None, torch.zeros(1, n, n)):
        s = make_stream(fr, comfy, branch, inp)
        assert s.unmasked
        img, txt = fb.double_block(dit.double_blocks[0], 0, inp["img"].clone(), inp["txt"].clone(), inp["vec"],
                                   inp["pe"], forced, s, att)
        x = fb.single_block(dit.single_blocks[1], 1, torch.cat((txt, img), 1), inp["vec"], inp["pe"], forced,
                            inp["txt"].shape[1], s, att)
        if forced is None:
            plain = (x, None if s.x is None else s.x.clone())
        else:
            torch.testing.assert_close(x, plain[0], atol=1e-5, rtol=1e-5)
            if s.x is not None:
                torch.testing.assert_close(s.x, plain[1], atol=1e-5, rtol=1e-5)


def test_schnell_without_guidance_embedding_runs(fr, comfy):
    """FLUX.1 schnell has no guidance_in: the references' modulation is time_in(0) + vector_in(y) only."""
    schnell = tm.tiny_flux(schnell=True)
    dit = schnell.model.diffusion_model
    m = patched(fr, comfy, schnell, make_branch(fr, dit))
    pos, neg = tm.flux_conditioning(0, tokens=16, guidance=None), tm.flux_conditioning(1, tokens=16, guidance=None)
    out = tm.sample(m, pos, neg, torch.zeros(1, 16, 16, 16), steps=2, cfg=2.0)
    base = tm.sample(schnell, pos, neg, torch.zeros(1, 16, 16, 16), steps=2, cfg=2.0)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-5
    y = torch.randn(1, 768)
    want = dit.time_in(fr.timestep_embedding(torch.zeros(1))) + dit.vector_in(y)
    torch.testing.assert_close(fb.reference_vec(dit, y, 1, fr.ReferenceOptions(), torch.float32, "cpu"), want)


@pytest.mark.parametrize("mode", ["joint", "self_cached"])
def test_two_chained_branches_equal_one_branch_with_all_references(fr, comfy, model, dit, mode):
    """TroupeReferenceBranch after another one: both sets of references join one joint attention, the outer
    branch's placed first (nearest the image), so the chain computes what one branch holding [outer refs,
    inner refs] computes. A tolerance: the attention sums over the keys in another order."""
    a, b = latents(seed=7, size=8), latents(seed=8, size=6)
    inner = patched(fr, comfy, model, make_branch(fr, dit, lats=a, attention=mode))
    chained = patched(fr, comfy, inner, make_branch(fr, dit, lats=b, attention=mode))
    one = patched(fr, comfy, model, make_branch(fr, dit, lats=b + a, attention=mode))
    out, want = sample(chained, *conditions()), sample(one, *conditions())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert (out - sample(inner, *conditions())).abs().max() > 1e-4  # the outer branch's references act
