"""The one patch lifecycle (nodes/lifecycle.py) across the three patch families, on the tiny SDXL and FLUX.

Every Apply node (TroupeApplySDXL, TroupeApplyFLUX, TroupeReferenceBranch) installs its patch on a clone under a
key of its own, with a run scope that gives each sampling run a fresh state and frees it when the run ends,
interrupted or not. Checked for chains of two and three Apply nodes of each family and for mixed chains, under
both clone semantics: the host's ``ModelPatcher.clone`` and ComfyUI >= 0.33's (only the dicts and lists of
``model_options`` copied, every other object shared; emulated by ``lifecycle_probe.clones`` on 0.3.75).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from fixtures import tiny_models as tm
from lifecycle_probe import fingerprint, sample

pytest_plugins = ["lifecycle_probe"]  # the runs and clones fixtures


STEPS = 2


# --------------------------------------------------------------------------- the Apply nodes' work functions


@pytest.fixture(scope="module")
def env():
    tm.ensure_comfy()
    from comfyui_troupe.nodes import flux, lifecycle, reference_branch, sdxl

    return {"sdxl": sdxl, "flux": flux, "reference": reference_branch, "lifecycle": lifecycle, "sdxl_base": tm.tiny_sdxl(0),
                "flux_base": tm.tiny_flux(), "clip": _tiny_sdxl_clip()}


def _tiny_sdxl_clip():
    """The test nodes' tiny SDXL CLIP (clip_l width 24: the MS-Diffusion file's phrase width below)."""
    path = Path(__file__).resolve().parents[1] / "custom_nodes" / "troupe_test_nodes" / "clip_nodes.py"
    spec = importlib.util.spec_from_file_location("troupe_test_clip_nodes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_sdxl_clip(seed=2, width_l=24, width_g=16)


def _features(n: int, seed: int, width: int = 64):
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures

    gen = torch.Generator().manual_seed(seed)
    return ClipFeatures(hidden=torch.randn(n, 3, 6, width, generator=gen), layers=(10, 17, 23), encoder="tiny",
                        labels=tuple("abcdefgh"[:n]), depth=24)


def _layout(seed: int, n: int = 2):
    from comfyui_troupe.models.layout.layout import Layout, Region

    shift = 0.1 * (seed % 3)
    return Layout(160, 96, tuple(Region(box=(i / n * 0.8 + shift / 2, 0.1, i / n * 0.8 + 0.5 + shift / 2, 0.9))
                                 for i in range(n)))


def apply_sdxl(env, model, seed: int, kind: str = "ip-adapter"):
    """TroupeApplySDXL: an IP-Adapter Plus file (separate attention) or an MS-Diffusion file (joint)."""
    from fixtures.sdxl_adapters import ip_adapter_plus_state_dict, ms_diffusion_state_dict

    from comfyui_troupe.models.adapter_file import detect_and_load
    from comfyui_troupe.models.sdxl.formats import FAMILY
    from comfyui_troupe.models.sdxl.patch import RegionalParams

    sd = ms_diffusion_state_dict(seed, phrase_dim=24) if kind == "ms-diffusion" else ip_adapter_plus_state_dict(seed)
    adapter = detect_and_load(sd, [FAMILY], f"{kind}.safetensors")
    return env["sdxl"].apply_sdxl(model, adapter, _features(2, seed), _layout(seed),
                                  RegionalParams(weight=1.0, blocks="all"), env["clip"])


def apply_flux(env, model, seed: int):
    """TroupeApplyFLUX with a troupe-flux file, two subjects in a layout."""
    from fixtures.flux_adapters import troupe_flux_state_dict

    from comfyui_troupe.models.flux import adapter as flux_adapter

    adapter = flux_adapter.load(troupe_flux_state_dict(), "troupe-flux")
    settings = env["flux"].ApplySettings(1.0 + 0.5 * seed, 0.0, 1.0, "image branch only")
    return env["flux"].apply_flux(model, adapter, _features(2, seed), settings, layout=_layout(seed))


def apply_reference(env, model, seed: int, attention: str = "joint"):
    """TroupeReferenceBranch's install: two references (8 x 8 latents) on every block."""
    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions

    gen = torch.Generator().manual_seed(100 + seed)
    latents = [torch.randn(16, 8, 8, generator=gen) for _ in range(2)]
    branch = ReferenceBranch(dit=model.model.diffusion_model, latents=latents, ref_subject=[0, 1],
                             options=ReferenceOptions(attention=attention))
    return env["reference"].install_branch(model, branch)


APPLY = {"sdxl": apply_sdxl, "flux": apply_flux, "reference": apply_reference}
FAMILY_OF = {"sdxl": "sdxl", "flux": "flux", "reference": "flux"}


def chain(env, steps: list[tuple[str, int]]):
    """The base model of the chain's family through one Apply node per (family, seed), in order."""
    model = env[f"{FAMILY_OF[steps[0][0]]}_base"]
    for family, seed in steps:
        model = APPLY[family](env, model, seed)
    return model


def run(env, model, callback=None) -> torch.Tensor:
    if model.model.diffusion_model.__class__.__name__ == "Flux":
        pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
        return sample(model, pos, neg, torch.zeros(1, 16, 12, 10), steps=STEPS, callback=callback)
    pos = tm.sdxl_conditioning(1, width=160, height=96)
    neg = tm.sdxl_conditioning(2, width=160, height=96)
    return sample(model, pos, neg, torch.zeros(1, 4, 12, 20), steps=STEPS, callback=callback)


CHAINS = {
    "sdxl x2": [("sdxl", 1), ("sdxl", 2)],
    "sdxl x3": [("sdxl", 1), ("sdxl", 2), ("sdxl", 3)],
    "flux x2": [("flux", 1), ("flux", 2)],
    "flux x3": [("flux", 1), ("flux", 2), ("flux", 3)],
    "reference x2": [("reference", 1), ("reference", 2)],
    "reference x3": [("reference", 1), ("reference", 2), ("reference", 3)],
    "flux + reference": [("flux", 1), ("reference", 1)],
    "reference + flux": [("reference", 1), ("flux", 1)],
    "reference + flux + reference": [("reference", 1), ("flux", 1), ("reference", 2)],
}


# --------------------------------------------------------------------------- one key and one run state per instance


@pytest.mark.parametrize("name", list(CHAINS))
def test_each_apply_has_its_own_key_and_run_state_freed_at_run_end(env, runs, clones, name):
    """n Apply nodes: n keys, n run scopes; one run gives each instance a state that it used and that holds nothing
    after the run; a second run starts from nothing and gives the same result; each Apply node changes the result."""
    lc = env["lifecycle"]
    model = chain(env, CHAINS[name])
    keys = list(lc.installed(model))
    assert len(keys) == len(set(keys)) == len(CHAINS[name])  # a key per instance, never a shared fixed one
    assert sorted(lc.run_scopes(model)) == sorted(keys)
    first = run(env, model)
    assert sorted(runs.keys()) == sorted(keys)
    assert all(s.held for s in runs.states), {s.key: s.held for s in runs.states}  # every instance cached in its run
    assert not runs.leftover()  # ... and holds nothing after it
    runs.clear()
    assert torch.equal(run(env, model), first) and len(runs.states) == len(keys) and not runs.leftover()
    shorter = chain(env, CHAINS[name][:-1])
    assert (first - run(env, shorter)).abs().max() > 1e-5  # the last Apply node acts in the chain


def test_the_mixed_sdxl_chain_joint_then_separate(env, runs, clones):
    """MS-Diffusion (joint attention) then IP-Adapter (separate) on one SDXL: both act, both states are freed."""
    lc = env["lifecycle"]
    joint = apply_sdxl(env, env["sdxl_base"], 1, kind="ms-diffusion")
    both = apply_sdxl(env, joint, 2)
    assert len(lc.installed(both)) == 2
    out = run(env, both)
    assert len(runs.states) == 2 and all(s.held for s in runs.states) and not runs.leftover()
    assert (out - run(env, joint)).abs().max() > 1e-5 and (out - run(env, apply_sdxl(env, env["sdxl_base"], 2))
                                                           ).abs().max() > 1e-5


def test_the_reference_branch_refuses_an_sdxl_model(env):
    """The reference branch is FLUX-only: on an SDXL model the node stops before any work, naming the input."""
    from comfyui_troupe.nodes.reference_branch import BranchInputs

    with pytest.raises(ValueError, match="TroupeReferenceBranch: input 'model': expected a FLUX model"):
        env["reference"].reference_branch(apply_sdxl(env, env["sdxl_base"], 1), None, [], BranchInputs(prompt="a"))


# --------------------------------------------------------------------------- interrupted runs


@pytest.mark.parametrize("name", ["sdxl x2", "flux x2", "reference x2", "reference + flux"])
def test_an_interrupted_run_frees_every_state(env, runs, clones, name):
    """ComfyUI's interrupt (raised from the step callback) mid-run: every instance had built its cache, none is
    left after; the next run equals a fresh model's."""
    import comfy.model_management

    model = chain(env, CHAINS[name])
    used = []

    def interrupt(step, *_):
        used.append([len(s.cache) for s in runs.states])
        raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(env, model, callback=interrupt)
    assert used and len(used[0]) == len(CHAINS[name]) and all(used[0])  # interrupted while holding entries
    assert not runs.leftover()
    assert torch.equal(run(env, model), run(env, chain(env, CHAINS[name])))


# --------------------------------------------------------------------------- clones


@pytest.mark.parametrize("name", ["sdxl x2", "flux x2", "reference x2", "reference + flux"])
def test_clones_share_no_state(env, runs, clones, name):
    """A clone of a patched model shares its (read-only) patch objects and nothing else: nothing they share changes
    during or after a run, every run has its own state, and clone, original and a fresh chain give one result."""
    model = chain(env, CHAINS[name])
    clone = model.clone()
    before = fingerprint(model)
    assert fingerprint(clone) == before  # the clone holds the same objects (shared, never copied)
    during = []
    outs = [run(env, m, callback=lambda *_, m=m: during.append(fingerprint(m))) for m in (model, clone, model)]
    assert during and all(f == before for f in during) and fingerprint(clone) == before
    assert len({id(s) for s in runs.states}) == len(runs.states) == 3 * len(CHAINS[name])  # a state per run
    assert all(s.held for s in runs.states) and not runs.leftover()
    fresh = run(env, chain(env, CHAINS[name]))
    assert all(torch.equal(o, fresh) for o in outs)


@pytest.mark.parametrize("family", ["sdxl", "flux", "reference"])
def test_two_applies_from_one_loader_and_the_base_model_stay_as_they_were(env, clones, family):
    """Two Apply nodes fed from one model give two independent models; the base model's options and output are
    bit for bit what they were (the contract: the input MODEL is never changed)."""
    import copy

    base = env[f"{FAMILY_OF[family]}_base"]
    options = copy.deepcopy(base.model_options)
    plain = run(env, base)
    one = APPLY[family](env, base, 1)
    first = run(env, one)
    two = APPLY[family](env, base, 2)
    run(env, two)
    assert torch.equal(run(env, one), first)
    assert base.model_options == options and torch.equal(run(env, base), plain)


def test_a_model_call_outside_a_sampler_keeps_nothing(env, runs):
    """``model_call_scope`` gives direct model calls (benchmarks) one state per instance, released at its end."""
    lc = env["lifecycle"]
    model = chain(env, CHAINS["flux x2"])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    context, extra = tm.flux_conditioning(0, tokens=16)[0]
    with lc.model_call_scope(model) as to, torch.inference_mode():
        model.model.apply_model(x, torch.full((1,), 0.5), c_crossattn=context, y=extra["pooled_output"],
                                guidance=torch.full((1,), 3.5), transformer_options=dict(to, sigmas=torch.full((1,), 0.5)))
        assert len(runs.states) == 2 and all(s.cache for s in runs.states)
    assert all(s.held for s in runs.states) and not runs.leftover()


def test_the_emulated_clone_copies_what_comfyui_033_copies(env):
    """``lifecycle_probe.clones`` copies dicts and lists and shares every other object; on a host that has
    ComfyUI >= 0.33's ``deepcopy_list_dict`` (PR 12382) the emulation gives exactly what the host gives."""
    import comfy.utils
    from lifecycle_probe import copy_dicts_and_lists

    shared = object()
    options = {"transformer_options": {"patches_replace": {"dit": {("double_block", 0): shared}}, "list": [shared]},
               "model_function_wrapper": shared}

    def shape(o):  # (kind, identity for shared objects) all the way down
        if isinstance(o, dict):
            return {k: shape(v) for k, v in o.items()}
        if isinstance(o, list):
            return [shape(v) for v in o]
        return id(o)

    ours = copy_dicts_and_lists(options)
    assert shape(ours) == shape(options) and ours["model_function_wrapper"] is shared
    assert ours["transformer_options"] is not options["transformer_options"]
    assert ours["transformer_options"]["list"] is not options["transformer_options"]["list"]
    host = getattr(comfy.utils, "deepcopy_list_dict", None)  # absent before 0.33: then only the emulation runs
    if host is not None:
        theirs = host(options)
        assert shape(theirs) == shape(ours) and theirs["transformer_options"] is not options["transformer_options"]
