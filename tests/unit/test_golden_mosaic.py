"""MOSAIC's reference LoRA gives what MOSAIC's own inference code gives (README, "Golden parity").

One forward of the tiny FLUX DiT with two references through ``TroupeReferenceBranch``'s patch, against
MOSAIC's ``transformer_forward`` (src/flux_omini.py) on diffusers' FLUX with the same weights: the LoRA on
MOSAIC's target modules at scale 1 for reference tokens only, references at ``inference.py``'s position
deltas, timestep 0 and guidance 1 for the references, no reference-to-reference attention.
Golden: tests/goldens/mosaic_reference.safetensors (scripts/make_goldens.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from fixtures.goldens import assert_parity, golden, golden_flux
from fixtures.reference_loras import mosaic_lora_state_dict
from fixtures.tiny_models import ensure_comfy

G = golden("mosaic_reference")


@pytest.fixture(scope="module")
def model():
    m = golden_flux()
    sd = m.model.diffusion_model.state_dict()
    assert torch.equal(sd["img_in.weight"], G["dit_img_in"]), \
        "the tiny FLUX fixture changed: regenerate tests/goldens with scripts/make_goldens.py"
    return m


def run(model, **options) -> torch.Tensor:
    """The model output (velocity) of one sampler call with the reference branch installed."""
    ensure_comfy()
    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions
    from comfyui_troupe.models.reference.lora import FluxDims, load_reference_lora
    from comfyui_troupe.nodes.reference_branch import install_branch

    dit = model.model.diffusion_model
    lora = load_reference_lora(mosaic_lora_state_dict(rank=4, seed=7), FluxDims.from_model(dit))
    branch = ReferenceBranch(dit=dit, latents=[G["ref_latent_0"], G["ref_latent_1"]], ref_subject=[0, 1],
                             options=ReferenceOptions(**options), lora=lora)
    patched = install_branch(model, branch)
    x, sigma = G["x"], G["timestep"]
    to = copy.copy(patched.model_options.get("transformer_options", {}))
    to["sigmas"], to["cond_or_uncond"] = sigma, [0]
    c = {"c_crossattn": G["context"], "y": G["y"], "guidance": G["guidance"], "transformer_options": to}
    with torch.inference_mode():
        denoised = patched.model_options["model_function_wrapper"](
            patched.model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})
    return (x - denoised) / sigma


def test_reference_positions_are_mosaics():
    from comfyui_troupe.models.reference.branch import reference_positions

    ours = reference_positions([(4, 4), (4, 4)])
    assert torch.equal(ours[0], G["ref_ids_0"]) and torch.equal(ours[1], G["ref_ids_1"])


def test_reference_branch_is_mosaics_transformer_forward(model):
    assert_parity(run(model), G["out"])


@pytest.mark.parametrize("options", [{"timestep": 0.7}, {"guidance": 3.5}, {"lora_strength": 0.5}])
def test_other_settings_miss_it(model, options):
    """Negative controls: the reference timestep, guidance and LoRA scale each show in the output."""
    with pytest.raises(AssertionError):
        assert_parity(run(model, **options), G["out"])
