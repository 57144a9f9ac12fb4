"""ComfyUI progress bars on the pack's slow set-up steps (issue 15, item 4): one step per subject and view."""
from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import ensure_comfy

from comfyui_troupe.models.layout.subject import Subject


@pytest.fixture()
def progress(monkeypatch):
    """The (value, total) after every update of a ComfyUI ProgressBar the pack creates (a recording stand-in:
    newer ComfyUI throttles the hook it calls, so the hook would not see every step)."""
    ensure_comfy()
    import comfy.utils

    seen: list[tuple[int, int]] = []

    class Recording:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update(self, value):
            self.current += value
            seen.append((self.current, self.total))

        def update_absolute(self, value, total=None, preview=None):
            self.total = total or self.total
            self.current = value
            seen.append((self.current, self.total))

    monkeypatch.setattr(comfy.utils, "ProgressBar", Recording)
    return seen


def test_reference_vae_encoding_counts_every_subject_and_view(progress):
    from comfyui_troupe.nodes import reference_branch

    vae = types.SimpleNamespace(encode=lambda pixels: torch.zeros(pixels.shape[0], 16, 4, 4))
    model = types.SimpleNamespace(model=types.SimpleNamespace(process_latent_in=lambda x: x))
    subjects = (Subject(image=torch.rand(2, 24, 24, 3), label="dog"),  # two views
                Subject(image=torch.rand(1, 24, 24, 3), label="cat"))
    latents, owner = reference_branch.encode_references(vae, model, subjects, 32)
    assert owner == [0, 0, 1] and len(latents) == 3
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_dino_encoding_reports_its_forward(progress):
    from fixtures.tiny_models import tiny_dinov2

    from comfyui_troupe.nodes import dino

    subjects = (Subject(image=torch.rand(1, 32, 32, 3), label="dog"),)
    dino.encode_subjects_dino(subjects, clip_vision=tiny_dinov2(layers=1))
    assert progress == [(1, 1)]


def test_reference_encoding_counts_each_subject_then_the_batched_forward(progress):
    from fixtures.tiny_models import tiny_clip_vision

    from comfyui_troupe.nodes import encoding

    subjects = tuple(Subject(image=torch.rand(1, 40, 30 + 10 * i, 3), label=f"s{i}") for i in range(3))
    features = encoding.encode_subjects(tiny_clip_vision(), subjects)
    assert features.hidden.shape[0] == 3
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]


# --------------------------------------------------------------------------- the first-call setup of each patch


SETUP_STEPS = 3


@pytest.fixture(scope="module")
def apply_env():
    """The Apply nodes' work functions and the tiny SDXL and FLUX of the lifecycle tests."""
    from fixtures import tiny_models as tm

    ensure_comfy()
    spec = importlib.util.spec_from_file_location("troupe_test_lifecycle", Path(__file__).with_name("test_lifecycle.py"))
    test_lifecycle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_lifecycle)

    from comfyui_troupe.nodes import flux, lifecycle, reference_branch, sdxl

    return {"sdxl": sdxl, "flux": flux, "reference": reference_branch, "lifecycle": lifecycle,
            "sdxl_base": tm.tiny_sdxl(0), "flux_base": tm.tiny_flux(), "clip": test_lifecycle._tiny_sdxl_clip(),
            "module": test_lifecycle}


def hook_points(model, family: str) -> int:
    """The hook points the Apply node installed (counted on the model, not by the lifecycle): its setup total."""
    replaces = model.model_options["transformer_options"]["patches_replace"]
    return len(replaces["attn2"]) if family == "sdxl" else len(replaces["dit"]) + (family == "reference")


def sample_steps(apply_env, model, progress) -> list[int]:
    """One sampling run of SETUP_STEPS steps; how many bar updates were seen when each step ended."""
    tl = apply_env["module"]
    seen_at_step: list[int] = []
    before = tl.STEPS
    tl.STEPS = SETUP_STEPS
    try:
        tl.run(apply_env, model, callback=lambda *a: seen_at_step.append(len(progress)))
    finally:
        tl.STEPS = before
    return seen_at_step


SETUPS = {
    "sdxl ip-adapter": ("sdxl", lambda env, tl: tl.apply_sdxl(env, env["sdxl_base"], 1)),
    "sdxl ms-diffusion": ("sdxl", lambda env, tl: tl.apply_sdxl(env, env["sdxl_base"], 1, kind="ms-diffusion")),
    "flux adapter": ("flux", lambda env, tl: tl.apply_flux(env, env["flux_base"], 1)),
    "reference joint": ("reference", lambda env, tl: tl.apply_reference(env, env["flux_base"], 1)),
    "reference self_cached": ("reference",
                              lambda env, tl: tl.apply_reference(env, env["flux_base"], 1, attention="self_cached")),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_the_first_call_setup_of_each_patch_fills_a_bar_once_per_run(apply_env, progress, name):
    """The sampler node's bar counts the patch's hook points as their per-run K/V are computed: it reaches the
    total during the first step, never moves on later steps, and a second run fills a new bar."""
    family, apply = SETUPS[name]
    model = apply(apply_env, apply_env["module"])
    total = hook_points(model, family)
    assert total > 1
    for _ in range(2):
        progress.clear()
        seen_at_step = sample_steps(apply_env, model, progress)
        assert len(seen_at_step) == SETUP_STEPS
        assert progress and progress[-1] == (total, total), progress[-3:]
        values = [value for value, _ in progress]
        assert values == sorted(set(values)) and all(t == total for _, t in progress)  # each point counted once
        assert seen_at_step == [len(progress)] * SETUP_STEPS  # all of it before the first step ended, none later
        if name in ("sdxl ip-adapter", "flux adapter", "reference self_cached"):  # one update per layer or block
            assert values == list(range(1, total + 1))


def test_a_layer_left_out_by_layer_weights_still_completes_the_setup(apply_env, progress):
    """A layer with weight 0 sets nothing up; it counts as done, so the bar still reaches its total."""
    import dataclasses

    from comfyui_troupe.models.sdxl.layer_weights import layer_weight, module_index
    from comfyui_troupe.models.sdxl.patch import RegionalAttentionPatch

    lifecycle = apply_env["lifecycle"]
    model = apply_env["module"].apply_sdxl(apply_env, apply_env["sdxl_base"], 1)
    patch = next(iter(lifecycle.installed(model).values()))
    keys = sorted(model.model_options["transformer_options"]["patches_replace"]["attn2"])
    listed = sorted({module_index(k) for k in keys})[1:]  # every module the model has but the first
    params = dataclasses.replace(patch.params, layer_weights=", ".join(f"{i}:1.0" for i in listed))
    skipping = RegionalAttentionPatch(patch.adapter, patch.tokens, patch.layout, params,
                                      uncond_tokens=patch.uncond_tokens, attention=patch.attention,
                                      sigma_to_t=patch.sigma_to_t)
    assert 0 < sum(layer_weight(skipping.layer_weights, k) == 0 for k in keys) < len(keys)
    sample_steps(apply_env, lifecycle.install(apply_env["sdxl_base"], skipping, "sdxl", attn2=keys), progress)
    assert progress[-1] == (len(keys), len(keys))


def test_the_reporter_costs_a_lookup_after_setup(apply_env):
    """After the first call every later report is a set look-up that updates no bar."""
    reporter = apply_env["lifecycle"].SetupProgress(2)
    updates = []
    reporter.bar = types.SimpleNamespace(update_absolute=lambda *a: updates.append(a))
    reporter("a")
    reporter("a")
    reporter("b", "a")
    reporter("c")
    assert updates == [(1, 2), (2, 2)]
