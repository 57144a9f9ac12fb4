"""FocusDPO (training/focusdpo.py): the Diffusion-DPO loss, the focus map, and tuning runs on the tiny SDXL models.

Hand computations are written out in each test; the equations are those of the module docstring (Diffusion-DPO,
Wallace et al. 2023, Eq. 14, and the focus map built from FocusDPO's abstract)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.pasted_msbench import photo, resized
from fixtures.training import preference_dataset, tiny_components, tiny_config
from safetensors.torch import load_file

from comfyui_troupe.training import focusdpo as fd
from comfyui_troupe.training.config import ConfigError
from comfyui_troupe.training.trainer import Components, Trainer, train

LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- the loss


def test_the_loss_is_log_2_when_the_tuned_model_is_the_reference():
    e = torch.tensor([0.3, 0.7, 1.1])
    loss, margin = fd.dpo_loss(e, e, e + 0.2, e + 0.2, beta=5000.0)
    assert torch.equal(margin, torch.zeros(3))
    assert torch.allclose(loss, torch.full((3,), LOG2), atol=0, rtol=1e-7)


def test_two_pair_toy_against_a_hand_computation_and_the_margin_moves_the_right_way():
    # pair 1: the tuned model fits the winner 0.02 better than ref and the loser 0.01 worse: margin
    #   -beta/2 * ((0.30 - 0.32) - (0.50 - 0.49)) = -5 * (-0.03) = 0.15, loss = log(1 + e^-0.15) = 0.62096
    # pair 2: winner 0.02 worse, loser 0.04 better: margin -5 * (0.02 + 0.04) = -0.30, loss = log(1 + e^0.30) = 0.85436
    model_w = torch.tensor([0.30, 0.40], requires_grad=True)
    model_l = torch.tensor([0.50, 0.41], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.32, 0.38]), torch.tensor([0.49, 0.45])
    loss, margin = fd.dpo_loss(model_w, ref_w, model_l, ref_l, beta=10.0)
    assert torch.allclose(margin, torch.tensor([0.15, -0.30]), atol=1e-6)
    assert torch.allclose(loss, torch.tensor([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.30))]), atol=1e-6)
    assert abs(float(loss[0].detach()) - 0.62096) < 1e-5 and abs(float(loss[1].detach()) - 0.85436) < 1e-5
    # one gradient step on the errors: the winners' errors fall, the losers' rise, both margins grow
    loss.sum().backward()
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()
    with torch.no_grad():
        _, after = fd.dpo_loss(model_w - 0.01 * model_w.grad, ref_w, model_l - 0.01 * model_l.grad, ref_l, beta=10.0)
    assert (after > margin).all()


def test_patch_errors_and_the_weighted_mean_by_hand():
    pred = torch.zeros(1, 2, 4, 4)
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2, :2] = 2.0  # top-left patch: channel 0 off by 2 -> mean over 2 channels x 4 pixels = (4*4)/8 = 2
    target[0, 1, 2:, 2:] = 1.0  # bottom-right patch: (4*1)/8 = 0.5
    err = fd.patch_errors(pred, target, 2)
    assert torch.equal(err, torch.tensor([[[2.0, 0.0], [0.0, 0.5]]]))
    w = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
    assert torch.allclose(fd.weighted_error(err, w), torch.tensor([(3 * 2.0 + 0.5) / 6]))  # 6.5 / 6
    # a latent side that is not a multiple of the patch: the edge patch averages the pixels it holds
    odd = fd.patch_errors(torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3), 2)
    assert odd.shape == (1, 2, 2) and torch.equal(odd, torch.ones(1, 2, 2))


# --------------------------------------------------------------------------- the focus map


def test_the_schedule_is_uniform_at_high_noise_and_the_whole_map_at_t0():
    focus = torch.tensor([[[4.0, 1.0], [1.0, 2.0]]])
    err = torch.ones(1, 2, 2)
    high = fd.focus_weights(focus, torch.tensor([1000.0]), err, err, gamma=1.0, kappa=1.0)
    assert torch.equal(high, torch.ones(1, 2, 2))
    low = fd.focus_weights(focus, torch.tensor([0.0]), err, err, gamma=1.0, kappa=1.0)
    assert torch.allclose(low, focus / 2.0)  # the map scaled to mean 1
    # half way with gamma 2: s = 0.5^2 = 0.25, W = 0.75 + 0.25 F, then mean 1 (mean of 0.75 + 0.25 F is 1.25)
    mid = fd.focus_weights(focus, torch.tensor([500.0]), err, err, gamma=2.0, kappa=0.0)
    assert torch.allclose(mid, (0.75 + 0.25 * focus) / 1.25)


def test_confidence_down_weights_patches_where_the_tuned_model_errs_more():
    e_model = torch.tensor([[[1.0, 3.0], [1.0, 1.0]]])
    e_ref = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # mean 1; excess 0, 2, 0 (model below ref), 1
    c = fd.confidence(e_model, e_ref, kappa=0.5)
    assert torch.allclose(c, torch.tensor([[[1.0, math.exp(-1.0)], [1.0, math.exp(-0.5)]]]))  # exp(-0.5 * excess / 1)
    assert not c.requires_grad


def test_gradient_energy_of_a_step_edge_and_of_a_flat_image():
    image = torch.zeros(16, 16, 3)
    image[:, 8:] = 1.0
    g = fd.gradient_energy(image, (2, 2))
    # the edge lies between columns 7 and 8: Sobel gx = 1 + 2 + 1 = 4 on columns 7 and 8, 0 elsewhere (replicate
    # padding keeps the borders flat); each 8-column cell holds one edge column: mean 4 / 8 = 0.5, over the max: 1
    assert torch.allclose(g, torch.ones(2, 2))
    assert torch.equal(fd.gradient_energy(torch.full((16, 16, 3), 0.3), (2, 2)), torch.zeros(2, 2))


def test_subject_allocation_follows_reference_complexity():
    """Step 3: with identical matches, a subject whose reference is twice as complex gets twice the added focus."""
    tokens = torch.eye(4)  # 2x2 image grid, one feature each
    ref = torch.eye(4)  # every image patch matches a reference patch exactly (strength 1)
    plain, detailed = torch.full((4,), 0.25), torch.full((4,), 0.5)
    boxes = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]  # left column, right column
    f = fd.focus_map(tokens, (2, 2), boxes, [(ref, plain), (ref, detailed)], strength=1.0, floor=0.0)
    # g = complexity / mean = 0.25 / 0.375 and 0.5 / 0.375; m = 1 * complexity; F = 1 + g m, then mean 1
    left, right = 1 + (0.25 / 0.375) * 0.25, 1 + (0.5 / 0.375) * 0.5
    expected = torch.tensor([[left, right], [left, right]])
    assert torch.allclose(f, expected / expected.mean())


def test_the_focus_map_concentrates_on_the_pasted_reference(msbench):
    """A real MS-Bench photo pasted at a known offset into a flat canvas: with features whose right answer is known
    (pixel patches, mean-centred: a flat patch matches nothing), the region's focus sits on the pasted cells."""
    import json

    spec = json.loads((msbench / "msbench.json").read_text())
    key = min(spec["subjects"])
    ref = resized(photo(msbench, spec["subjects"][key]["image"]), 64, 64)
    canvas = torch.full((128, 128, 3), 0.5)
    top, left = 40, 24  # multiples of the 8-pixel patch: pasted cells equal reference cells exactly
    canvas[top:top + 64, left:left + 64] = ref
    box = (8 / 128, 16 / 128, 120 / 128, 120 / 128)  # the subject's box is larger than the photo
    tokens, grid = fd.pixel_patch_tokens(canvas[None], 8)
    ref_tokens, ref_grid = fd.pixel_patch_tokens(ref[None], 8)
    f = fd.focus_map(tokens[0], grid, [box], [(ref_tokens[0], fd.gradient_energy(ref, ref_grid).flatten())])
    pasted = torch.zeros(grid, dtype=torch.bool)
    pasted[top // 8:(top + 64) // 8, left // 8:(left + 64) // 8] = True
    region = fd.box_cells(box, grid)
    added = f / f.min() - 1  # what the map adds over the flat background
    assert float(added[region & ~pasted].max()) == pytest.approx(0.0, abs=1e-6)  # flat cells match nothing
    assert float(added[~region].max()) == 0.0
    assert float(added[pasted].mean()) > 0.1  # (a flat part of the photo itself may add nothing)
    # and on the latent patch grid of a 128 px image (16 x 16 latent, patch 2: 8 x 8), the mass follows
    # (strength 1: F = 1 + m with m <= 1, so a matched cell weighs at most twice a background cell)
    latent = fd.to_latent_grid(f, (8, 8))
    overlap = torch.nn.functional.adaptive_avg_pool2d(pasted[None].float(), (8, 8))[0]
    inside, outside = overlap == 1, overlap == 0
    assert torch.allclose(latent[outside], latent.min().expand(int(outside.sum())))  # untouched cells: background
    assert float(latent[inside].mean()) > 1.2 * float(latent.min())


# --------------------------------------------------------------------------- tuning runs


@pytest.fixture(scope="module")
def pairs(module_tmp, msbench) -> Path:
    return preference_dataset(module_tmp / "data", msbench)


@pytest.fixture(scope="module")
def start_adapter(module_tmp, pairs) -> Path:
    """A tiny MS-Diffusion file to tune (the DPO reference model too)."""
    from comfyui_troupe.models.sdxl.formats import save_sdxl_adapter
    from comfyui_troupe.training.sdxl import new_adapter

    comps = tiny_components(module_tmp)
    sizes = tiny_config(module_tmp, pairs, "ms-diffusion", 1).adapter
    path = module_tmp / "start.safetensors"
    save_sdxl_adapter(str(path), new_adapter("ms-diffusion", comps.base_model.diffusion_model, sizes, seed=3))
    return path


def components(work: Path, adapter: Path) -> Components:
    from comfyui_troupe.models.adapter_file import detect_and_load, read_state_dict
    from comfyui_troupe.nodes.adapter import families

    comps = tiny_components(work)
    comps.initial_adapter = detect_and_load(read_state_dict(str(adapter)), families()).module
    return comps


def dpo_config(work: Path, manifest: Path, adapter: Path, steps: int = 30, **sections):
    method = {"init_adapter": str(adapter), "dpo_beta": 2000.0, **sections.pop("method", {})}
    train_ = {"learning_rate": 3e-4, "checkpoint_every": steps, **sections.pop("train", {})}
    data = {"cache_dir": str(manifest.parent.parent / "cache"), **sections.pop("data", {})}
    return tiny_config(work, manifest, "focusdpo", steps, method=method, train=train_, data=data, **sections)


def test_focusdpo_needs_a_starting_adapter_and_dino(pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.init_adapter: focusdpo tunes a trained adapter"):
        tiny_config(tmp_path, pairs, "focusdpo", 3)
    with pytest.raises(ConfigError, match=r"model\.dino: required when method\.name is \"focusdpo\""):
        tiny_config(tmp_path, pairs, "focusdpo", 3, model={"dino": ""}, method={"init_adapter": "x.safetensors"})


def test_a_manifest_without_losers_is_refused_by_name(pairs, start_adapter, tmp_path):
    plain = pairs.parent / "manifest.jsonl"  # the pasted records, no "loser"
    config = dpo_config(tmp_path, plain, start_adapter, steps=2)
    with pytest.raises(ConfigError, match=r'focusdpo trains on preference pairs; line\(s\) \[1, 2, 3'):
        Trainer(config, components(tmp_path, start_adapter), show_bar=False)


def test_at_the_start_the_loss_is_exactly_log_2(pairs, start_adapter, tmp_path):
    trainer = Trainer(dpo_config(tmp_path, pairs, start_adapter), components(tmp_path, start_adapter), show_bar=False)
    batch = trainer.batch(0, 0)
    out = trainer.module(trainer.frozen, batch)
    assert float(out["margin"]) == 0.0
    assert float(out["loss"].detach()) == pytest.approx(LOG2, abs=1e-7)
    assert trainer.evaluate() == pytest.approx(LOG2, abs=1e-7)
    # the focus maps are cached on the latent patch grid, one per image of the pair, mean 1, larger in the boxes
    focus = batch[0].focus
    assert focus.shape == (2, 4, 4) and torch.allclose(focus.mean((1, 2)), torch.ones(2))


@pytest.fixture(scope="module")
def tuned(pairs, start_adapter, module_tmp):
    work = module_tmp / "tuned"
    config = dpo_config(work, pairs, start_adapter, steps=30, train={"checkpoint_every": 15})
    return config, train(config, components(work, start_adapter), show_bar=False)


def test_thirty_steps_raise_the_implicit_preference_margin(tuned, start_adapter):
    _, result = tuned
    evals = [r["eval_diffusion"] for r in result.log if "eval_diffusion" in r]
    assert evals[0] == pytest.approx(LOG2, abs=1e-7)
    # the fixed batch's DPO loss below log 2 means its mean margin became positive: the tuned adapter fits the
    # pasted winners better than the swapped losers, relative to where it started
    assert evals[-1] < LOG2 - 0.01, evals
    margins = [r["margin"] for r in result.log if "margin" in r and r["margin"] == r["margin"]]
    assert np.mean(margins[-10:]) > np.mean(margins[:10]), margins
    # what changed is the adapter; the file loads as the starting one did, with every key
    before, after = load_file(str(start_adapter)), load_file(str(result.adapter_path))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_plain_diffusion_dpo_differs_from_the_focus_weighted_loss(pairs, start_adapter, tmp_path):
    """focus_strength 0 and confidence_kappa 0 give plain Diffusion-DPO (a uniform mean): after one step the two
    runs' adapters differ, so the focus map reaches the gradient."""
    runs = {}
    for name, method in (("focus", {}), ("plain", {"focus_strength": 0.0, "confidence_kappa": 0.0})):
        work = tmp_path / name
        config = dpo_config(work, pairs, start_adapter, steps=2, method=method)
        runs[name] = load_file(str(train(config, components(work, start_adapter), show_bar=False).adapter_path))
    assert any(not torch.allclose(runs["focus"][k], runs["plain"][k]) for k in runs["focus"])


def test_resume_reproduces_the_uninterrupted_run(tuned, pairs, start_adapter, tmp_path):
    config, result = tuned
    work = tmp_path / "resumed"
    (work / "run").mkdir(parents=True)
    shutil.copytree(Path(config.train.output_dir) / "checkpoint-0000015", work / "run" / "checkpoint-0000015")
    resumed = train(dpo_config(work, pairs, start_adapter, steps=30, train={"checkpoint_every": 15,
                                                                            "resume": "latest"}),
                    components(work, start_adapter), show_bar=False)
    assert resumed.steps == 30
    a, b = load_file(str(result.adapter_path)), load_file(str(resumed.adapter_path))
    for k in a:  # the same data, noise and reference model: float rounding only
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_two_processes_match_one_process(pairs, start_adapter, tmp_path):
    """The same global batch (4 pairs) on 1 process and on 2 processes of 2 pairs: the same tuned adapter, up to the
    order gloo sums in (the tolerances of the toolkit's own 2-process test, tests/unit/test_training_run.py)."""
    from fixtures.training import launch

    tiny_components(tmp_path)  # the DINO folder both processes read, made before they start
    runs = {}
    for n, batch in ((1, 4), (2, 2)):
        config = dpo_config(tmp_path, pairs, start_adapter, steps=4,
                            train={"batch_size": batch, "output_dir": str(tmp_path / f"p{n}" / "run")})
        runs[n] = launch(tmp_path / f"p{n}", config, n)
    diffs = torch.cat([(runs[1][k] - runs[2][k]).abs().flatten().float() for k in runs[1]])
    assert float(diffs.mean()) < 1e-6, float(diffs.mean())
    assert float(diffs.max()) < 1e-3, float(diffs.max())


# --------------------------------------------------------------------------- FLUX (DynaIP adapter)


def test_focusdpo_flux_starts_at_log_2_and_raises_the_margin(pairs, tmp_path):
    """``focusdpo-flux`` on the tiny FLUX.1-dev DiT: a DynaIP adapter and its HMoE fusion (new, seeded) are the
    starting and reference model; the loss is log 2 at step 0 and the fixed batch's DPO loss falls in 20 steps; the
    files load as the starting ones did (TroupeLoadAdapter's and TroupeLoadFusion's loaders)."""
    from fixtures.tiny_models import ensure_comfy, tiny_hf_dinov2_folder
    from fixtures.training_flux import dynaip_config, flux_components

    ensure_comfy()
    from comfyui_troupe.models.adapter_file import detect_and_load, read_state_dict
    from comfyui_troupe.models.encoding.dino import load_hf_dino
    from comfyui_troupe.models.encoding.hmoe import hmoe_from_state_dict
    from comfyui_troupe.nodes.adapter import families
    from comfyui_troupe.nodes.encoding import vision_blocks
    from comfyui_troupe.training.config import parse_config
    from comfyui_troupe.training.flux import FluxTrainModule, fusion_path_for, new_modules, save_outputs

    comps = flux_components()
    tiny_hf_dinov2_folder(tmp_path / "dino")
    comps.dino = load_hf_dino(str(tmp_path / "dino"))
    config = dynaip_config(tmp_path, pairs, 20, method={"name": "focusdpo-flux", "dpo_beta": 2000.0,
                                                        "init_adapter": str(tmp_path / "start.safetensors")},
                           model={"dino": str(tmp_path / "dino")}, train={"learning_rate": 3e-3, "checkpoint_every": 20},
                           data={"cache_dir": str(pairs.parent.parent / "cache-flux")})
    data = config.to_dict()  # and one [[sample]] case, rendered at the last step through TroupeApplyFLUX
    ref = min((pairs.parent / "refs").glob("*.png"))
    data["sample"] = [{"prompt": "a dog", "width": 64, "height": 64, "steps": 2, "cfg": 1.0,
                       "subjects": [{"label": "dog", "image": str(ref), "box": [0.1, 0.1, 0.6, 0.9]}]}]
    data["train"]["sample_every"] = 20
    config = parse_config(data, tmp_path)
    width = int(vision_blocks(comps.clip_vision)[0].layer_norm1.weight.shape[0])
    adapter, fusion = new_modules(comps.base_model.diffusion_model, width, config.adapter, seed=5)
    save_outputs(FluxTrainModule(adapter, fusion), tmp_path / "start.safetensors")
    comps.initial_adapter = detect_and_load(read_state_dict(str(tmp_path / "start.safetensors")), families()).module
    comps.initial_fusion = hmoe_from_state_dict(read_state_dict(str(fusion_path_for(tmp_path / "start.safetensors"))))

    trainer = Trainer(config, comps, show_bar=False)
    assert trainer.evaluate() == pytest.approx(LOG2, abs=1e-7)
    result = trainer.run()
    evals = [r["eval_diffusion"] for r in result.log if "eval_diffusion" in r]
    assert evals[-1] < LOG2 - 0.005, evals
    tuned = detect_and_load(read_state_dict(str(result.adapter_path)), families())
    assert tuned.format == "troupe-flux"
    hmoe_from_state_dict(read_state_dict(str(fusion_path_for(result.adapter_path))))
    assert result.last_samples == Path(config.train.output_dir) / "samples" / "step-0000020.png"
    from PIL import Image

    with Image.open(result.last_samples) as im:
        assert im.size[0] == 64 and im.size[1] > 64
