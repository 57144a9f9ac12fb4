"""DynaIP training on the tiny FLUX models (CPU): the flow-matching target through ComfyUI's own denoiser, the
trainable FluxInjection against the inference patch, DDS in training, HMoE expert dropout, the two data stages,
a 36-step run, the saved files in the pack's loaders, and resume."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import ensure_comfy
from fixtures.training_flux import (
    dynaip_config,
    flux_components,
    staged_dataset,
    stored_in_bf16,
    tiny_training_flux,
)
from PIL import Image
from safetensors.torch import load_file

from comfyui_troupe.models.adapter_file import detect_and_load, read_state_dict
from comfyui_troupe.models.encoding.hmoe import HMoE, HMoEConfig
from comfyui_troupe.models.flux.adapter import new_troupe_adapter
from comfyui_troupe.models.flux.injection import BOTH, IMAGE_ONLY, InjectionParams
from comfyui_troupe.models.flux.patch import GEOMETRY_KEY, FluxInjection
from comfyui_troupe.models.layout.layout import Layout, Region
from comfyui_troupe.training.flux import (
    FluxSample,
    FluxTrainModule,
    FrozenFlux,
    TrainingInjection,
    expert_drops,
    flow_matching_pair,
    stage_of,
    staged_record,
)
from comfyui_troupe.training.trainer import EVAL_STREAM, Trainer, comfy_training_mode, train

STEPS = 36


# --------------------------------------------------------------------------- the objective


def test_flow_matching_target_denoises_to_x0_through_comfyui():
    """ComfyUI's FLUX sampling (CONST) fed the target as the model output must return x0, and its own noise
    scaling must give our x_t."""
    ensure_comfy()
    import comfy.model_sampling

    class FluxSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass  # what model_base.Flux builds for FLUX.1

    sampling = FluxSampling()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.02, 0.5, 1.0])
    x_t, target = flow_matching_pair(x0, noise, sigma)
    assert torch.allclose(sampling.noise_scaling(sigma, noise, x0), x_t, atol=1e-6)
    assert torch.equal(sampling.calculate_input(sigma, x_t), x_t)
    assert torch.allclose(sampling.calculate_denoised(sigma, target, x_t), x0, atol=1e-5)


def test_timesteps_are_the_models_shifted_schedule():
    """The trainer draws sigma uniformly from the model's own table: sigma = e^mu / (e^mu + 1/t - 1), mu = shift."""
    base = tiny_training_flux().model
    frozen = FrozenFlux(base, "cpu")
    mu = base.model_sampling.shift
    t = torch.arange(1, 10001, dtype=torch.float64) / 10000
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(frozen.sigmas.double(), expected, atol=1e-6)
    assert float((frozen.sigmas > 0.5).float().mean()) > 0.6  # shifted towards high noise (mu = 1.15)


# --------------------------------------------------------------------------- the trainable patch


def _adapter_and_layouts(seed: int = 0):
    torch.manual_seed(seed)
    adapter = new_troupe_adapter(64, 64, 32, 2, 2).float()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layouts = [Layout(64, 64, (Region(box=(0.0, 0.0, 0.6, 1.0)), Region(box=(0.4, 0.0, 1.0, 1.0)))),
               Layout(64, 64, (Region(box=(0.0, 0.25, 1.0, 0.75)),))]
    return adapter, layouts


def _forward(dit, x, context, y, replaces):
    t = torch.tensor([0.7] * x.shape[0])
    opts = {"patches_replace": {"dit": replaces}, GEOMETRY_KEY: (x.shape[-2], x.shape[-1], context.shape[1])}
    return dit(x, t, context, y=y, guidance=torch.full((x.shape[0],), 3.5), transformer_options=opts)


def _inference_replaces(patch: FluxInjection, nd: int, ns: int) -> dict:
    run: dict = {}
    out = {}
    for kind, count in (("double_block", nd), ("single_block", ns)):
        for i in range(count):
            out[(kind, i)] = lambda a, e, _k=(kind, i): patch.dit_block(_k, a, e, run)
    return out


def test_trainable_injection_gives_the_inference_numbers_and_gradients():
    """Per sample, the training forward (batch 2, each sample its own layout and tokens) equals the inference
    patch at batch 1; trainable=True changes no number; every block's K/V and the projection get a gradient."""
    dit = tiny_training_flux().model.diffusion_model
    adapter, layouts = _adapter_and_layouts()
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)]
    x, context, y = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 64, generator=g), torch.randn(2, 768, generator=g)
    params = InjectionParams(dds=BOTH)
    with torch.no_grad():
        expected = []
        for b in range(2):
            tokens = adapter.image_proj(feats[b])
            frozen = FluxInjection(adapter, tokens, params, layouts[b], 2)
            ref = _forward(dit, x[b:b + 1], context[b:b + 1], y[b:b + 1], _inference_replaces(frozen, 2, 2))
            trainable = FluxInjection(adapter, tokens, params, layouts[b], 2, trainable=True)
            same = _forward(dit, x[b:b + 1], context[b:b + 1], y[b:b + 1], _inference_replaces(trainable, 2, 2))
            assert torch.equal(ref, same)  # trainable keeps the inference numbers bit for bit
            expected.append(ref)
    patches = [FluxInjection(adapter, adapter.image_proj(f), params, lay, 2, trainable=True)
               for f, lay in zip(feats, layouts)]
    with comfy_training_mode():  # ComfyUI 0.33's FLUX RoPE is differentiable only in its training mode
        out = _forward(dit, x, context, y, TrainingInjection(patches).replaces(2, 2))
        assert torch.allclose(out, torch.cat(expected), atol=1e-5)
        base = _forward(dit, x, context, y, {})
        assert (out - base).abs().max() > 1e-3  # the term reaches the output
        out.square().mean().backward()
    for n, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n


def test_dds_text_tokens_get_the_term_in_training_only():
    """Eq. 5: training injects into both branches (text tokens too, M = 1); the inference rule (image branch only)
    leaves the text stream exactly as the base block computes it."""
    dit = tiny_training_flux().model.diffusion_model
    adapter, layouts = _adapter_and_layouts()
    g = torch.Generator().manual_seed(2)
    x, context, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g), torch.randn(1, 768, generator=g)
    torch.manual_seed(3)
    module = FluxTrainModule(adapter, HMoE(HMoEConfig(in_dim=64, out_dim=64, router_hidden=32))).eval()
    sample = FluxSample(latent=x[0], context=context[0], pooled=y[0], layout=layouts[0],
                        levels=torch.randn(2, 3, 5, 64, generator=g), noise=x[0], sigma=0.5, drop_image=False,
                        expert_drop=torch.zeros(2, 3, dtype=torch.bool))
    with torch.no_grad():
        (patch,) = module.injections(FrozenFlux(tiny_training_flux().model, "cpu"), [sample])  # what training runs
    trained = TrainingInjection([patch])
    infer = FluxInjection(adapter, patch.tokens, InjectionParams(dds=IMAGE_ONLY), layouts[0], 2)
    outs = {}

    def compare(args, extra):  # double block 0, while the forward runs (its original_block is bound to it now)
        def fresh():
            return dict(args, img=args["img"].clone(), txt=args["txt"].clone())

        outs["base"] = extra["original_block"](fresh())
        outs["train"] = trained(fresh(), dict(extra, troupe_block=("double_block", 0)))
        outs["infer"] = infer.dit_block(("double_block", 0), fresh(), extra, {})
        return extra["original_block"](args)

    with torch.no_grad():
        _forward(dit, x, context, y, {("double_block", 0): compare})
    base = outs["base"]
    assert (outs["train"]["txt"] - base["txt"]).abs().max() > 1e-4  # training: the text tokens get the term
    assert torch.equal(outs["infer"]["txt"], base["txt"])  # inference: not at all
    assert (outs["infer"]["img"] - base["img"]).abs().max() > 1e-4
    assert (outs["train"]["img"] - outs["infer"]["img"]).abs().max() < 1e-5  # the image rows get the same term


def test_a_batch_with_every_image_dropped_still_backpropagates():
    """CFG dropout can drop every image of a micro-batch: the loss is the base model's and every trained weight
    gets a zero gradient (not none), so the backward pass and DDP's averaging run as on any step."""
    base = tiny_training_flux().model
    torch.manual_seed(0)
    module = FluxTrainModule(new_troupe_adapter(64, 64, 32, 2, 2), HMoE(HMoEConfig(in_dim=64, out_dim=64,
                                                                                      router_hidden=32))).train()
    g = torch.Generator().manual_seed(4)
    sample = FluxSample(latent=torch.randn(16, 8, 8, generator=g), context=torch.randn(7, 64, generator=g),
                        pooled=torch.randn(768, generator=g), layout=_adapter_and_layouts()[1][1],
                        levels=torch.randn(1, 3, 5, 64, generator=g), noise=torch.randn(16, 8, 8, generator=g),
                        sigma=0.5, drop_image=True, expert_drop=torch.zeros(1, 3, dtype=torch.bool))
    out = module(FrozenFlux(base, "cpu"), [sample])
    out["loss"].backward()
    assert torch.equal(out["loss"], out["diffusion"])
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


# --------------------------------------------------------------------------- HMoE expert dropout


def test_expert_dropout_drops_each_expert_with_its_rate_and_never_at_eval():
    """Each expert's feature is dropped independently with 5%. 20,000 draws per expert: the standard error of a
    rate is sqrt(0.05 * 0.95 / 20000) = 0.0015, so 4 standard errors (0.0062) would fail by chance with
    probability ~6e-5; the joint rate of two experts (0.0025, standard error 0.00035) checks independence."""
    gen = torch.Generator().manual_seed(0)
    drops = torch.cat([expert_drops(gen, 4, 3, 0.05) for _ in range(5000)])  # [20000, 3]
    rates = drops.float().mean(0)
    assert torch.all((rates - 0.05).abs() < 4 * math.sqrt(0.05 * 0.95 / 20000)), rates
    joint = (drops[:, 0] & drops[:, 1]).float().mean()
    assert abs(float(joint) - 0.0025) < 4 * math.sqrt(0.0025 * 0.9975 / 20000), joint
    # a dropped expert contributes nothing (Eq. 8 without its term); eval ignores the drops
    torch.manual_seed(0)
    fusion = HMoE(HMoEConfig(in_dim=64, out_dim=64, router_hidden=32))
    module = FluxTrainModule(new_troupe_adapter(64, 64, 32, 2, 2), fusion)
    levels = torch.randn(2, 3, 5, 64)
    dropped = torch.tensor([[True, False, False], [False, False, True]])
    res = fusion(levels)
    kept = (~dropped).float()
    manual = torch.einsum("bl,bl,blgd->bgd", res.weights, kept, fusion.experts_out(levels))
    assert torch.allclose(fusion(levels, dropped=dropped).fused, manual, atol=1e-6)
    module.train()
    assert torch.allclose(module.tokens(levels, dropped), module.adapter.image_proj(manual), atol=1e-6)
    module.eval()
    assert torch.equal(module.tokens(levels, dropped), module.adapter.image_proj(res.fused))


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def dataset(module_tmp, msbench) -> Path:
    """16 pasted records, the last 6 of kind "cross"."""
    return staged_dataset(module_tmp / "flux-train" / "data", msbench)


def config_for(work: Path, dataset: Path, steps: int = STEPS, **sections):
    sections.setdefault("data", {})["cache_dir"] = str(dataset.parent.parent / "cache")
    return dynaip_config(work, dataset, steps, **sections)


@pytest.fixture(scope="module")
def dynaip_run(dataset, module_tmp):
    work = module_tmp / "dynaip"
    config = config_for(work, dataset)
    result = train(config, flux_components(), show_bar=False)
    return config, result


def test_stages_draw_intra_then_cross_records(dataset, tmp_path):
    """Stage 1 draws only intra-pair records, stage 2 only cross-pair ones, each stage its own records in a
    seeded order; the fixed evaluation batch draws from every record and drops nothing."""
    config = config_for(tmp_path, dataset, steps=40, dropout={"text": 0.05, "image": 0.05, "both": 0.05})
    trainer = Trainer(config, flux_components(), show_bar=False)
    kinds = [r.kind for r in trainer.records]
    assert kinds.count("cross") == 6
    method = trainer.method
    per_step = config.train.batch_size
    seen = {"intra": set(), "cross": set()}
    for pos in range(40 * per_step):
        stage = stage_of(pos // per_step, config.method.stage1_steps)
        i = method.record_at(trainer, pos)
        assert kinds[i] == stage, (pos, i)
        seen[stage].add(i)
    assert seen["intra"] == {i for i, k in enumerate(kinds) if k == "intra"}  # 20 steps x 2 cover all 10
    assert seen["cross"] == {i for i, k in enumerate(kinds) if k == "cross"}
    evals = [trainer.sample_at(EVAL_STREAM + i) for i in range(64)]
    assert not any(s.drop_image or s.expert_drop.any() for s in evals)
    drawn = [trainer.sample_at(p) for p in range(400)]
    assert 0 < sum(s.drop_image for s in drawn) < 100 and any(s.expert_drop.any() for s in drawn)


def test_staged_stream_is_the_same_for_any_number_of_processes():
    """2 processes x batch 2 and 1 process x batch 4 (and 4 x 1) train on the same records at every step: the stage
    and the record depend on the global batch only (each process takes its slice, ``positions``)."""
    from comfyui_troupe.training.trainer import positions

    stages = {"intra": [0, 2, 3, 5, 7, 8], "cross": [1, 4, 6, 9]}
    for step in range(12):
        per_run = []
        for world, batch in ((1, 4), (2, 2), (4, 1)):
            pos = [p for r in range(world) for p in positions(step, 0, 1, batch, r, world)]
            per_run.append([staged_record(5, p, world * batch, 6, stages) for p in pos])
        assert per_run[0] == per_run[1] == per_run[2]
        assert set(per_run[0]) <= set(stages["intra" if step < 6 else "cross"])


def test_dynaip_run_lowers_the_fixed_batch_loss(dynaip_run):
    _, result = dynaip_run
    evals = [r["eval_diffusion"] for r in result.log if r.get("eval_diffusion", "") != ""]
    assert result.steps == STEPS and len(evals) == 3  # step 0, the checkpoint at 18, the end
    assert evals[-1] < evals[0] * 0.93, evals  # measured: 1.334 -> 1.163 (-13%)


def test_saved_files_load_in_the_pack_loaders(dynaip_run):
    """The adapter is a troupe-flux file for TroupeLoadAdapter and the fusion a troupe.hmoe file for
    TroupeLoadFusion, written side by side at each checkpoint and at the end, with the trained weights."""
    ensure_comfy()
    import folder_paths

    from comfyui_troupe.nodes.adapter import families
    from comfyui_troupe.nodes.encoding import load_fusion

    config, result = dynaip_run
    out = Path(config.train.output_dir)
    for folder, stem in ((out, out.name), (out / "checkpoint-0000018", "adapter"), (out / "checkpoint-0000036", "adapter")):
        adapter = detect_and_load(read_state_dict(str(folder / f"{stem}.safetensors")), families())
        assert (adapter.family, adapter.format) == ("flux", "troupe-flux")
        assert (adapter.module.config.double_blocks, adapter.module.config.single_blocks) == (2, 2)
        assert (folder / f"{stem}.hmoe.safetensors").exists()
    folder_paths.add_model_folder_path("troupe", str(out))
    fusion = load_fusion(f"{out.name}.hmoe.safetensors")
    assert (fusion.config.in_dim, fusion.config.out_dim, fusion.config.num_levels) == (64, 64, 3)
    saved = load_file(str(out / f"{out.name}.hmoe.safetensors"))
    assert all(torch.equal(saved[k], v.float()) for k, v in fusion.state_dict().items())
    first = load_file(str(out / "checkpoint-0000018" / "adapter.safetensors"))
    final = load_file(str(result.adapter_path))
    assert any(not torch.equal(first[k], final[k]) for k in final)  # it kept training after the checkpoint


def test_resume_at_the_checkpoint_reproduces_the_uninterrupted_run(dynaip_run, dataset, tmp_path):
    config, result = dynaip_run
    work = tmp_path / "resumed"
    (work / "run").mkdir(parents=True)
    shutil.copytree(Path(config.train.output_dir) / "checkpoint-0000018", work / "run" / "checkpoint-0000018")
    resumed = train(config_for(work, dataset, train={"resume": "latest"}), flux_components(), show_bar=False)
    assert resumed.steps == STEPS
    for name in (result.adapter_path.name, result.adapter_path.stem + ".hmoe.safetensors"):
        a = load_file(str(result.adapter_path.parent / name))
        b = load_file(str(resumed.adapter_path.parent / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)


def test_a_base_stored_in_bf16_trains_in_its_manual_cast_dtype(dataset, tmp_path):
    """A base whose weights ComfyUI holds in bf16 and computes in fp32 (manual cast, as on a device without fast
    bf16) trains in fp32, as ComfyUI samples it: 3 DynaIP steps give the weights of an fp32 base whose weights were
    rounded to bf16, within 1e-6. Computing in the storage dtype instead (bf16 activations) moves them by about
    the learning rate."""
    from comfyui_troupe.training.trainer import compute_dtype

    fp32 = tiny_training_flux().model
    bf16 = stored_in_bf16(fp32)
    with torch.no_grad():
        for p in fp32.diffusion_model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert (bf16.get_dtype(), compute_dtype(bf16), compute_dtype(fp32)) == (torch.bfloat16, torch.float32,
                                                                           torch.float32)
    runs = {}
    for name, base in (("fp32", fp32), ("bf16", bf16)):
        comps = flux_components()
        comps.base_model = base
        config = config_for(tmp_path / name, dataset, steps=3, train={"checkpoint_every": 3},
                            method={"stage1_steps": 3})
        runs[name] = load_file(str(train(config, comps, show_bar=False).adapter_path))
    for k in runs["fp32"]:
        assert torch.allclose(runs["fp32"][k], runs["bf16"][k], atol=1e-6, rtol=0), k


def test_a_cpu_run_computes_in_fp32_whatever_the_precision(dataset, tmp_path, caplog):
    """``train.precision`` autocasts on a GPU only (``autocast_precision``); on a CPU every precision gives the fp32
    run's weights exactly (bf16 autocast, which ComfyUI never uses on a CPU, moves them by up to 4e-4 in 2 steps),
    and the log says so."""
    from comfyui_troupe.training.trainer import autocast_precision

    assert [autocast_precision(p, cpu=False) for p in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    assert {autocast_precision(p, cpu=True) for p in ("fp32", "bf16", "fp16")} == {"no"}
    runs = {}
    for precision in ("fp32", "bf16"):
        config = config_for(tmp_path / precision, dataset, steps=2, train={"checkpoint_every": 2,
                                                                            "precision": precision},
                            method={"stage1_steps": 2})
        runs[precision] = load_file(str(train(config, flux_components(), show_bar=False).adapter_path))
    for k in runs["fp32"]:
        assert torch.equal(runs["fp32"][k], runs["bf16"][k]), k
    assert "train.precision bf16: mixed precision is a GPU feature here" in caplog.text


def test_sample_grid_shows_what_the_saved_files_give_in_a_users_graph(dataset, tmp_path):
    """A dynaip run with one [[sample]] case writes its grid at the last step, and the case's image is the one the
    saved files give through the user's route: the adapter file read by TroupeLoadAdapter's loader, the fusion file
    by TroupeLoadFusion's, TroupeEncodeSubjects with that fusion, TroupeApplyFLUX, ComfyUI's sampler (euler, simple,
    FluxGuidance 3.5), bit for bit."""
    ensure_comfy()
    import comfy.model_patcher
    import comfy.sample

    from comfyui_troupe.models.encoding.hmoe import hmoe_from_state_dict
    from comfyui_troupe.models.layout.subject import Subject
    from comfyui_troupe.nodes.adapter import families
    from comfyui_troupe.nodes.encoding import encode_subjects
    from comfyui_troupe.nodes.flux import ApplySettings, apply_flux
    from comfyui_troupe.training.config import parse_config
    from comfyui_troupe.training.data import load_rgb
    from comfyui_troupe.training.flux import fusion_path_for
    from comfyui_troupe.training.samples import generate

    refs = sorted((dataset.parent / "refs").glob("*.png"))
    case = {"prompt": "a dog and a teapot", "width": 64, "height": 64, "steps": 3, "cfg": 1.0, "seed": 3,
            "subjects": [{"label": "dog", "image": str(refs[0]), "box": [0.05, 0.2, 0.45, 0.8]},
                         {"label": "teapot", "image": str(refs[1]), "box": [0.55, 0.1, 0.95, 0.6]}]}
    data = config_for(tmp_path, dataset, steps=2, train={"checkpoint_every": 2, "sample_every": 2},
                      method={"stage1_steps": 2}).to_dict()
    data["sample"] = [case]
    config = parse_config(data, tmp_path)
    comps = flux_components()
    trainer = Trainer(config, comps, show_bar=False)
    result = trainer.run()
    assert result.last_samples == Path(config.train.output_dir) / "samples" / "step-0000002.png"
    with Image.open(result.last_samples) as im:
        assert im.size[0] == 64 and im.size[1] > 64
    mine = generate(trainer, config.samples[0])

    adapter = detect_and_load(read_state_dict(str(result.adapter_path)), families())
    fusion = hmoe_from_state_dict(read_state_dict(str(fusion_path_for(result.adapter_path))))
    subjects = [Subject(image=load_rgb(s["image"])[None], label=s["label"]) for s in case["subjects"]]
    layout = Layout(64, 64, tuple(Region(box=tuple(s["box"]), label=s["label"]) for s in case["subjects"]))
    features = encode_subjects(comps.clip_vision, subjects, layers="10,17,24", fusion=fusion)
    with torch.inference_mode():
        model = apply_flux(comfy.model_patcher.ModelPatcher(comps.base_model, torch.device("cpu"),
                                                            torch.device("cpu")),
                           adapter, features, ApplySettings(), layout=layout)

        def cond(text):
            c, pooled = comps.clip.encode_from_tokens(comps.clip.tokenize(text), return_pooled=True)
            return [[c, {"pooled_output": pooled, "guidance": 3.5}]]

        latent = torch.zeros(1, 16, 8, 8)
        out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), 3, 1.0, "euler", "simple",
                                  cond(case["prompt"]), cond(""), latent, seed=3, disable_pbar=True)
        theirs = comps.vae.decode(out)[0].float().clamp(0, 1)
    assert mine.shape == (64, 64, 3)
    assert torch.equal(mine, theirs)


def test_gradient_checkpointing_recomputes_every_block_and_changes_no_weight(dataset, tmp_path, monkeypatch):
    """4 DynaIP steps with every block recomputed in the backward pass give the weights of the plain run. ComfyUI's
    blocks add to their streams in place; inside the checkpointed region they get ``OutOfPlace`` streams, so the
    recomputation reads the block's true inputs (a recomputation from overwritten inputs moves the weights by up to
    lr x steps = 4e-2). Each block's call runs twice per training forward with checkpointing (the forward and its
    recomputation), once without; the model itself is never patched."""
    from comfyui_troupe.training.flux import TrainingInjection

    calls = {"n": 0}
    inner = TrainingInjection.__call__

    def counted(self, *a, **k):
        calls["n"] += torch.is_grad_enabled()
        return inner(self, *a, **k)

    monkeypatch.setattr(TrainingInjection, "__call__", counted)
    runs, counts = {}, {}
    for gc in (False, True):
        comps = flux_components()
        config = config_for(tmp_path / f"gc{gc}", dataset, steps=4,
                            train={"gradient_checkpointing": gc, "checkpoint_every": 4}, method={"stage1_steps": 4})
        calls["n"] = 0
        runs[gc] = load_file(str(train(config, comps, show_bar=False).adapter_path))
        counts[gc] = calls["n"]
        assert all("forward" not in m.__dict__ for m in comps.base_model.diffusion_model.modules())
    blocks = 4  # the tiny DiT: 2 double + 2 single
    assert counts[False] == 4 * blocks and counts[True] == 2 * 4 * blocks, counts  # 4 steps of batch 2, one forward
    for k in runs[False]:
        assert torch.allclose(runs[False][k], runs[True][k], atol=1e-6, rtol=0), k
