"""Redux tokens through ComfyUI's own StyleModelApply, in both strength modes, into the reference branch's DEM.

AlignGen's DEM (Eq. 4 of 002) reads each subject's Redux tokens and the branch removes them from the text stream.
In ``attn_bias`` mode StyleModelApply also makes an attention mask sized for those tokens (ComfyUI then scales
it to the image tokens); the branch re-indexes it for the aligned context, so the run works and the bias, which
only ever touched the removed Redux columns, leaves no trace: attn_bias at any strength equals multiply at 1.
"""
from __future__ import annotations

import types

import pytest
import torch
from fixtures.tiny_models import ensure_comfy, flux_conditioning, sample, tiny_flux

N_T5 = 16
LABELS = [[2, 3], [7]]


def redux_conditioning(strength: float, mode: str) -> list:
    """Positive conditioning after one StyleModelApply per subject (the Redux projection stubbed by identity)."""
    ensure_comfy()
    import comfy.sd

    import nodes

    cond = flux_conditioning(seed=0, tokens=N_T5)
    style = comfy.sd.StyleModel(torch.nn.Identity())
    gen = torch.Generator().manual_seed(1)
    for _ in LABELS:
        vision = types.SimpleNamespace(last_hidden_state=torch.randn(1, 729, 4096, generator=gen) * 0.5)
        (cond,) = nodes.StyleModelApply().apply_stylemodel(cond, style, vision, strength, mode)
    return cond


def patched_model():
    ensure_comfy()
    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions
    from comfyui_troupe.models.reference.dem import Alignment, DeviationExtractionModule
    from comfyui_troupe.nodes.reference_branch import install_branch

    model = tiny_flux()
    torch.manual_seed(0)
    dem = DeviationExtractionModule(dim=4096, redux_dim=4096, heads=2, mlp_ratio=64 / 4096, inner=64).eval()
    gen = torch.Generator().manual_seed(2)
    latents = [torch.randn(16, 4, 4, generator=gen) for _ in LABELS]
    branch = ReferenceBranch(dit=model.model.diffusion_model, latents=latents, ref_subject=[0, 1],
                             options=ReferenceOptions(), dem=Alignment(dem=dem, label_positions=LABELS, n_t5=N_T5))
    return install_branch(model, branch)


@pytest.fixture(scope="module")
def model():
    return patched_model()


def run(model, strength: float, mode: str) -> torch.Tensor:
    positive = redux_conditioning(strength, mode)
    negative = flux_conditioning(seed=3, tokens=N_T5)
    return sample(model, positive, negative, torch.zeros(1, 16, 8, 8), steps=1)


def test_attn_bias_mask_is_reindexed_for_the_aligned_context(model):
    cond = redux_conditioning(0.5, "attn_bias")
    assert cond[0][1]["attention_mask"].shape[-1] == N_T5 + 2 * 729 + 1  # StyleModelApply: + 1 image cell
    biased = run(model, 0.5, "attn_bias")
    assert torch.isfinite(biased).all()
    assert torch.equal(biased, run(model, 1.0, "multiply"))


def test_multiply_mode_scales_what_the_dem_reads(model):
    assert not torch.equal(run(model, 0.5, "multiply"), run(model, 1.0, "multiply"))


def test_align_mask_keeps_text_and_image_and_drops_redux():
    from comfyui_troupe.models.reference.dem import REDUX_TOKENS, Alignment

    a = Alignment(dem=None, label_positions=LABELS, n_t5=N_T5)
    n_ctx, n_img = N_T5 + 2 * REDUX_TOKENS, 6
    mask = torch.randn(1, n_ctx + n_img, n_ctx + n_img)
    out = a.align_mask(mask, n_ctx)
    assert out.shape[-1] == N_T5 + 2 + n_img
    idx = a.context_index(n_ctx)
    assert idx.tolist()[:10] == [0, 1, -1, 2, 3, 4, 5, 6, -1, 7]  # S* before each label's first token
    assert torch.equal(out[0, -n_img:, -n_img:], mask[0, -n_img:, -n_img:])
    assert torch.equal(out[0, 0, :2], mask[0, 0, :2]) and float(out[0, 2].abs().sum()) == 0.0
