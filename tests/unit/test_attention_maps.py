"""TroupeAttentionMaps: the recorder on the tiny SDXL (joint, separate) and FLUX (DynaIP, reference branch), sampled.

The maps must be the attention mass each subject's tokens get (checked at one layer against MS-Diffusion's biased
joint softmax written out by hand, and through whole runs against what the softmax gives by construction), zero
outside the region of a subject the mask confines, and recording must change no output pixel.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from fixtures import tiny_models as tm
from lifecycle_probe import sample

STEPS = 2


@pytest.fixture(scope="module")
def env():
    tm.ensure_comfy()
    from comfyui_troupe.nodes import attention_maps, flux, lifecycle, reference_branch, sdxl

    path = Path(__file__).resolve().parents[1] / "custom_nodes" / "troupe_test_nodes" / "clip_nodes.py"
    spec = importlib.util.spec_from_file_location("troupe_test_clip_nodes", path)
    clip_nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip_nodes)
    return {"sdxl": sdxl, "flux": flux, "reference": reference_branch, "lifecycle": lifecycle, "maps": attention_maps, "sdxl_base": tm.tiny_sdxl(0),
            "flux_base": tm.tiny_flux(), "clip": clip_nodes.tiny_sdxl_clip(seed=2, width_l=24, width_g=16)}


def features(n: int, seed: int):
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures

    gen = torch.Generator().manual_seed(seed)
    return ClipFeatures(hidden=torch.randn(n, 3, 6, 64, generator=gen), layers=(10, 17, 23), encoder="tiny",
                        labels=tuple("abcdefgh"[:n]), depth=24)


def layout():
    """Two overlapping boxes that leave a background strip (joint attention's three pixel groups and no region)."""
    from comfyui_troupe.models.layout.layout import Layout, Region

    return Layout(160, 96, (Region(box=(0.05, 0.1, 0.55, 0.9)), Region(box=(0.4, 0.2, 0.8, 0.8))))


def apply_sdxl(env, kind: str):
    from fixtures.sdxl_adapters import ip_adapter_plus_state_dict, ms_diffusion_state_dict

    from comfyui_troupe.models.adapter_file import detect_and_load
    from comfyui_troupe.models.sdxl.formats import FAMILY
    from comfyui_troupe.models.sdxl.patch import RegionalParams

    sd = ms_diffusion_state_dict(1, phrase_dim=24) if kind == "joint" else ip_adapter_plus_state_dict(1)
    adapter = detect_and_load(sd, [FAMILY], f"{kind}.safetensors")
    return env["sdxl"].apply_sdxl(env["sdxl_base"], adapter, features(2, 1), layout(),
                                  RegionalParams(weight=1.0, blocks="all"), env["clip"])


def apply_flux(env):
    from fixtures.flux_adapters import troupe_flux_state_dict

    from comfyui_troupe.models.flux import adapter as flux_adapter

    adapter = flux_adapter.load(troupe_flux_state_dict(), "troupe-flux")
    settings = env["flux"].ApplySettings(1.0, 0.0, 1.0, "image branch only")
    return env["flux"].apply_flux(env["flux_base"], adapter, features(2, 1), settings, layout=layout())


def apply_reference(env, region: bool = True, spy=None):
    """TroupeReferenceBranch's install: two references (8 x 8 latents), subject i confined to region i or not;
    ``spy`` wraps the branch's attention function (the test's own computation of what it attends)."""
    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions
    from comfyui_troupe.models.reference.branch import sdpa_attention as plain

    gen = torch.Generator().manual_seed(101)
    latents = [torch.randn(16, 8, 8, generator=gen) for _ in range(2)]
    model = env["flux_base"]
    branch = ReferenceBranch(dit=model.model.diffusion_model, latents=latents, ref_subject=[0, 1],
                             options=ReferenceOptions(attention="joint", region=region),
                             region_masks=lambda h, w: layout().masks(h, w))
    if spy is None:
        return env["reference"].install_branch(model, branch)
    return env["reference"].install_branch(model, branch, attention=spy(plain))


MODELS = {"sdxl joint": lambda env: apply_sdxl(env, "joint"), "sdxl separate": lambda env: apply_sdxl(env, "separate"),
          "flux dynaip": apply_flux, "reference branch": apply_reference}


def run(model) -> torch.Tensor:
    if model.model.diffusion_model.__class__.__name__ == "Flux":
        pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
        return sample(model, pos, neg, torch.zeros(1, 16, 12, 20), steps=STEPS)
    pos = tm.sdxl_conditioning(1, width=160, height=96)
    neg = tm.sdxl_conditioning(2, width=160, height=96)
    return sample(model, pos, neg, torch.zeros(1, 4, 12, 20), steps=STEPS)


def grid_means(recording) -> dict[tuple[int, int], torch.Tensor]:
    """Each token grid's mean map [N, h, w] over its recorded calls (batch item 0)."""
    rec = recording.last
    return {(h, w): (s[0] / rec.counts[(h, w)]).reshape(-1, h, w).cpu() for (h, w), s in rec.sums.items()}


def expected_masks(name: str, h: int, w: int) -> torch.Tensor:
    """The mass each subject's softmax gives it, times its output mask: joint attention's groups sum to 1 on the
    pixels a region covers (the dummy tokens get exp(-10000) = 0) and are 0 on the background; separate / DynaIP:
    a softmax over the subject's own tokens (mass 1) times its coverage M_i."""
    from comfyui_troupe.models.flux.injection import token_masks

    if name == "flux dynaip" or name == "reference branch":
        return token_masks(layout(), h * 2, w * 2).reshape(-1, h, w)
    if name == "sdxl separate":
        return layout().masks(h, w, edge="coverage")
    return layout().masks(h, w, edge="binary")  # only the sum over subjects is fixed: 1 where covered


# --------------------------------------------------------------------------- recording changes nothing


@pytest.mark.parametrize("name", list(MODELS))
def test_recording_changes_no_output_pixel(env, name):
    """The recorded model's samples equal the unrecorded model's bit for bit; two runs give two equal recordings."""
    model = MODELS[name](env)
    recorded, recording = env["maps"].record_attention(model, "all", 0.0, 1.0)
    plain = run(model)
    assert torch.equal(run(recorded), plain)
    first, calls = grid_means(recording), dict(recording.last.counts)
    assert first and recording.runs == 1
    assert torch.equal(run(recorded), plain) and recording.runs == 2
    second = grid_means(recording)  # a re-run replaces the maps, it does not add to them
    assert recording.last.counts == calls
    assert first.keys() == second.keys() and all(torch.allclose(first[g], second[g]) for g in first)


def test_an_interrupted_run_publishes_nothing(env):
    """ComfyUI's interrupt mid-run: the recording keeps the last finished run's recorder, untouched."""
    import comfy.model_management

    recorded, recording = env["maps"].record_attention(apply_sdxl(env, "separate"), "all", 0.0, 1.0)
    run(recorded)
    finished, calls = recording.last, dict(recording.last.counts)

    def interrupt(step, *_):
        raise comfy.model_management.InterruptProcessingException()

    pos = tm.sdxl_conditioning(1, width=160, height=96)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(recorded, pos, pos, torch.zeros(1, 4, 12, 20), steps=STEPS, callback=interrupt)
    assert recording.last is finished and recording.last.counts == calls and recording.runs == 1


# --------------------------------------------------------------------------- the maps are the attention mass


@pytest.mark.parametrize("name", list(MODELS))
def test_maps_sum_to_the_subject_mass_and_stay_in_confined_regions(env, name):
    """Through a whole run, at every token grid: the maps sum to the mass the subjects' tokens get, and a subject
    confined by its mask (separate, DynaIP: output times M_i; joint: its tokens biased out) is 0 outside it."""
    recorded, recording = env["maps"].record_attention(MODELS[name](env), "all", 0.0, 1.0)
    run(recorded)
    means = grid_means(recording)
    assert means
    for (h, w), got in means.items():
        masks = expected_masks(name, h, w)
        if name == "reference branch":  # Eq. 6 of 002: an image token outside region i sees none of i's tokens
            masks = (masks >= 0.5).float()
            covered = got.sum(0)[masks.bool().any(0)]
            assert (covered > 0).all() and (covered < 1).all()  # text and image keys take the rest
        elif name == "sdxl joint":
            covered = (masks > 0.5).any(0).float()
            torch.testing.assert_close(got.sum(0), covered, atol=1e-5, rtol=0)
            assert got[:, covered == 0].abs().max() == 0  # the background attends to nothing
        else:
            torch.testing.assert_close(got, masks.float(), atol=1e-5, rtol=0)
        for i in range(got.shape[0]):
            assert got[i][masks[i] == 0].abs().max() == 0, (name, (h, w), i)  # zero outside its region


def test_joint_maps_equal_ms_diffusions_biased_softmax_at_one_layer(env):
    """One attn2 call of the joint patch: each subject's map equals the head-mean mass its tokens get in
    MS-Diffusion's softmax over [4 dummy tokens | all subjects' tokens] with the -10000 bias, written out here."""
    from comfyui_troupe.models.attention_record import RUN_KEY, AttentionRecorder, RecordSettings

    patch = next(iter(env["lifecycle"].installed(apply_sdxl(env, "joint")).values()))
    key = patch.adapter.layer_keys()[0]
    width = patch.adapter.kv(key)[0].weight.shape[0]
    heads, h, w = 2, 6, 10
    q = torch.randn(1, h * w, width, generator=torch.Generator().manual_seed(5))
    recorder = AttentionRecorder(RecordSettings())
    extra = {"n_heads": heads, "block": key[:2], "block_index": key[2], "original_shape": [1, 4, h, w],
             "cond_or_uncond": [0]}
    patch.attn2(q, q, q, extra, {RUN_KEY: recorder})
    got = recorder.sums[(h, w)][0].reshape(2, h, w)

    run: dict = {}
    kk = patch.projections(run, key, q.device, q.dtype)["k"] * patch.token_scales(run, float("inf"), q.device,
                                                                                     q.dtype)[0][..., None]
    per = kk.shape[1]
    region = layout().masks(h, w, edge="binary").flatten(1) > 0.5  # [N, P]
    keys = torch.cat([torch.zeros(4, width), kk.flatten(0, 1)])  # dummy keys: biased to exp(-10000) = 0 wherever used
    bias = torch.zeros(h * w, keys.shape[0])
    bias[:, :4] = torch.where(region.any(0), -10000.0, 0.0)[:, None]
    for j in range(2):
        bias[:, 4 + j * per:4 + (j + 1) * per] = torch.where(region[j], 0.0, -10000.0)[:, None]
    d = width // heads
    qh, kh = q[0].reshape(h * w, heads, d), keys.reshape(-1, heads, d)
    probs = torch.softmax(torch.einsum("phd,thd->hpt", qh, kh) / d ** 0.5 + bias, -1).mean(0)  # [P, 4 + N * per]
    expected = torch.stack([probs[:, 4 + j * per:4 + (j + 1) * per].sum(1) for j in range(2)])
    expected = expected * region.any(0)  # the background's output is zeroed: it attends to no subject
    torch.testing.assert_close(got, expected.reshape(2, h, w), atol=1e-5, rtol=0)
    assert (got.sum(0) - region.any(0).float().reshape(h, w)).abs().max() < 1e-5


def test_reference_maps_sum_to_the_reference_mass_of_its_joint_attention(env):
    """Reference branch through a run: at each block the summed map equals the mass the image rows give to all
    reference tokens in the block's joint attention over [text | image | references], computed here from the
    attention call's own q, k and mask with a full softmax (mean over the recorded calls)."""
    seen = []

    def spy(plain):
        def attention(q, k, v, pe=None, mask=None, **kwargs):
            n_ref = 2 * 16
            if k.shape[2] > q.shape[2] - n_ref and q.shape[2] >= 16 + 60:  # the call with every key (first)
                logits = torch.einsum("bhpd,bhtd->bhpt", q.float(), k.float()) / q.shape[-1] ** 0.5
                if mask is not None:
                    logits = logits + mask[:, None].float()
                probs = torch.softmax(logits, -1).mean(1)  # [B, rows, keys]
                n_base = k.shape[2] - n_ref
                seen.append(probs[0, 16:16 + 60, n_base:].sum(-1))  # cond row 0, image tokens, reference keys
            return plain(q, k, v, pe=pe, mask=mask, **kwargs)
        return attention

    model = apply_reference(env, spy=spy)
    recorded, recording = env["maps"].record_attention(model, "all", 0.0, 1.0)
    pos = tm.flux_conditioning(0, tokens=16)
    sample(recorded, pos, pos, torch.zeros(1, 16, 12, 20), steps=STEPS, cfg=1.0)
    got = grid_means(recording)[(6, 10)].sum(0).flatten()
    assert len(seen) == sum(recording.last.counts.values()) > 0
    torch.testing.assert_close(got, torch.stack(seen).mean(0), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- blocks, steps, render, errors


def test_blocks_and_step_range_select_what_is_averaged(env):
    """Only down blocks: no up-block call counted; an empty window: nothing recorded, and the render says so."""
    model = apply_sdxl(env, "separate")
    all_model, everything = env["maps"].record_attention(model, "all", 0.0, 1.0)
    down_model, down = env["maps"].record_attention(model, "down", 0.0, 1.0)
    run(all_model), run(down_model)
    assert sum(down.last.counts.values()) < sum(everything.last.counts.values())
    late_model, late = env["maps"].record_attention(model, "all", 0.999, 1.0)
    run(late_model)  # sigmas of a 2-step run: none inside [sigma(1.0), sigma(0.999)] except the final 0
    with pytest.raises(ValueError, match="TroupeAttentionMapsRender: input 'recording': the sampled model had no"):
        env["maps"].attention_maps(torch.zeros(1, 96, 160, 3), late)


def test_render_gives_one_map_per_subject_and_the_argmax_map(env):
    """N heat-maps and one argmax frame per image; the argmax frame has subject i's colour where i got most mass."""
    from comfyui_troupe.evaluation.attention_maps import IMAGE_SHARE, subject_colours

    recorded, recording = env["maps"].record_attention(apply_sdxl(env, "separate"), "all", 0.0, 1.0)
    with pytest.raises(ValueError, match="TroupeAttentionMapsRender: input 'recording': no sampling run"):
        env["maps"].attention_maps(torch.zeros(1, 96, 160, 3), recording)
    run(recorded)
    image = torch.zeros(1, 96, 160, 3)
    frames = env["maps"].attention_maps(image, recording)
    assert frames.shape == (3, 96, 160, 3)
    left = frames[2, 48, 10]  # only region 0 covers x = 10 / 160
    torch.testing.assert_close(left, (1 - IMAGE_SHARE) * subject_colours(2)[0])
    assert frames[2, 48, 150].abs().max() == 0  # x = 150 / 160: no region, black
    from comfyui_troupe.models.layout.subject import Subject

    subjects = tuple(Subject(image=torch.zeros(1, 8, 8, 3), label=name) for name in ("dog", "bear"))
    titled = env["maps"].attention_maps(image, recording, subjects)
    assert titled.shape == frames.shape and (titled[:, 2, 2] - frames[:, 2, 2]).abs().max() > 0  # the titles
    assert torch.equal(titled[:, 60:], frames[:, 60:])  # ... only in the corner
    with pytest.raises(ValueError, match="TroupeAttentionMapsRender: input 'subjects': 1 subjects but the run"):
        env["maps"].attention_maps(image, recording, subjects[:1])
    with pytest.raises(ValueError, match="TroupeAttentionMaps: input 'end_percent'"):
        env["maps"].record_attention(apply_sdxl(env, "separate"), "all", 0.6, 0.4)
