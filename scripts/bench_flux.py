"""Per-step cost of TroupeApplyFLUX (DynaIP image cross-attention, Eq. 9 of 004) vs the base FLUX DiT, in one run.

A reduced-depth CPU proxy of FLUX.1: ComfyUI's own Flux class at the full width (hidden 3072, 24 heads of 128,
MLP ratio 4, T5 context 4096, axes 16/56/56, guidance embedding) but only ``--double`` double and ``--single``
single blocks (FLUX.1 has 19 + 38), random weights, fp32. The adapter is a troupe-flux adapter of the same
width reading 577 tokens of width 1024 per subject (CLIP ViT-L/14-336, as DynaIP). Subjects sit in disjoint
vertical strips of a layout; ``image branch only``. A step is one model evaluation (guidance-distilled: no
uncond pass). The first patched step of a run also projects K/V for every block (once per run); it is
reported on its own. Peak memory is the largest resident-set growth during a step (sampled every 5 ms, after
``malloc_trim``), since CPU torch has no allocator statistics. Time is reported as process CPU time per
step (less disturbed by other processes on a shared machine than wall time) and as wall time, each the
fastest of ``--repeats`` alternating base / patched steps.

Run: .host/venv/bin/python scripts/bench_flux.py [--size 384] [--subjects 1,2,3,4] [--repeats 5]
Prints a markdown table (the README's FLUX adapter section).

``--family [--quick] [--peer-instantx DIR] [--peer-xflux DIR] [--peer-site DIR]`` (what ``make bench`` runs): one
table of the standard benchmark columns through ComfyUI's sampler (cfg 1): base; TroupeApplyFLUX with a troupe-flux
file (3 subjects x 577 tokens in vertical strips), with an InstantX file (3 x 128 tokens) and with an XLabs file
(1 x 16 tokens); the InstantX port for ComfyUI with the same InstantX file, one Apply node per subject chained (as
its README does; no regions); x-flux-comfyui with the same XLabs file and its own sampler (XlabsSampler's
``denoise``), one subject: chaining a second ApplyFluxIPAdapter replaces the first (its ``merge_loras`` keeps the
newer image prompt). The adapter files are written in their published layouts (``tests/fixtures/flux_adapters``)
at the proxy's width and depth; the peers run in the model's dtype (fp32 here) instead of casting their layers
to fp16 / bf16, which CPU matmuls would only slow down. The InstantX port imports ``diffusers``: if the host has
none, ``pip install --target DIR diffusers==0.31.0`` and pass ``--peer-site DIR``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model helpers (ComfyUI in-process on CPU) live with the tests

import conftest  # noqa: F401  (registers the pack as comfyui_troupe; sets 1 torch thread)
import torch
from bench_common import (
    Config,
    Inside,
    NotRun,
    PeakRSS,
    attention_flops,
    count_added,
    family_table,
    interleave,
    kv_projection_flops,
    run_flops,
    sampler_run,
    tensor_bytes,
)

FULL_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def build_model(double: int, single: int):
    from fixtures.tiny_models import _patcher, ensure_comfy, init_weights

    ensure_comfy()
    import comfy.supported_models

    cfg = comfy.supported_models.Flux(dict(FULL_FLUX, depth=double, depth_single_blocks=single))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    init_weights(model.diffusion_model, seed=0)
    return _patcher(model)


def build_adapter(double: int, single: int, encoder_dim: int = 1024):
    from fixtures.tiny_models import init_weights

    from comfyui_troupe.models.adapter_file import Adapter
    from comfyui_troupe.models.flux.adapter import TROUPE, FluxAdapterConfig, FluxImageAdapter

    config = FluxAdapterConfig(format=TROUPE, encoder_dim=encoder_dim, context_dim=3072, hidden_size=3072,
                               double_blocks=double, single_blocks=single, head_dim=128)
    module = init_weights(FluxImageAdapter(config), seed=1).eval().requires_grad_(False)
    return Adapter(family="flux", format=TROUPE, module=module)


def patched_model(base, adapter, n: int, tokens: int, encoder_dim: int):
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.nodes.flux import ApplySettings, apply_flux

    gen = torch.Generator().manual_seed(n)
    feats = ClipFeatures(hidden=torch.randn(n, 3, tokens, encoder_dim, generator=gen), layers=(10, 17, 24),
                         encoder="ViT-L/14-336 shaped", labels=tuple(f"s{i}" for i in range(n)), depth=24)
    layout = Layout(1024, 1024, tuple(Region(box=(i / n, 0.0, (i + 1) / n, 1.0)) for i in range(n)))
    return apply_flux(base, adapter, feats, ApplySettings(), layout=layout)


def step(model, x, sigma, context, pooled, run_options=None):
    """One model evaluation as calc_cond_batch makes it (cond only, guidance-distilled); ``run_options``: the
    transformer options of a run (``lifecycle.model_call_scope``), so the per-run K/V are kept between steps."""
    to = dict(run_options if run_options is not None else model.model_options.get("transformer_options", {}))
    to.update(sigmas=sigma, cond_or_uncond=[0])
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=context, y=pooled, guidance=torch.full((1,), 3.5),
                                       transformer_options=to)


def peer_package(name: str, path: Path) -> str:
    """A peer checkout importable as package ``name`` without running its ``__init__`` (which registers nodes
    and imports what only its loaders need): ``importlib.import_module(name + ".module")`` then works."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(path)]
    sys.modules[name] = pkg
    return name


def flux_features(n: int, tokens: int, pooled: int, encoder_dim: int = 1024, crop: str = "pad"):
    """Random ClipFeatures of ``n`` subjects: 3 levels of ``tokens`` tokens, and pooled embeddings of width ``pooled``."""
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures

    gen = torch.Generator().manual_seed(n)
    return ClipFeatures(hidden=torch.randn(n, 3, tokens, encoder_dim, generator=gen), layers=(10, 17, 24),
                        encoder="benchmark", labels=tuple(f"s{i}" for i in range(n)), depth=24,
                        image_embeds=torch.randn(n, pooled, generator=gen), pooled=torch.randn(n, pooled, generator=gen),
                        crop=crop, crop_choice=crop)


def strips(n: int):
    from comfyui_troupe.models.layout.layout import Layout, Region

    return Layout(1024, 1024, tuple(Region(box=(i / n, 0.0, (i + 1) / n, 1.0)) for i in range(n)))


def instantx_peer(base, path: Path, file: Path, embeds: torch.Tensor, inside: Inside):
    """The InstantX port's Apply node, once per subject, chained, on the proxy: its MLPProjModel and
    IPAFluxAttnProcessor2_0 layers loaded from the .bin as its loader does (SigLIP left out: ``embeds`` are the
    pooled embeddings), its FluxUpdateModules on each clone, the processors in the model's dtype."""
    pkg = peer_package("troupe_bench_instantx", path)
    ipf = importlib.import_module(f"{pkg}.ipadapter_flux")
    proc_mod = importlib.import_module(f"{pkg}.attention_processor")
    utils = importlib.import_module(f"{pkg}.utils")
    cls = proc_mod.IPAFluxAttnProcessor2_0
    if not getattr(cls.__call__, "troupe_timed", False):  # the per-subject image term, timed like ours
        cls.__call__ = inside.wrap(cls.__call__)
        cls.__call__.troupe_timed = True
    sd = torch.load(file, map_location="cpu", weights_only=True)
    tokens = sd["image_proj"]["proj.2.weight"].shape[0] // 4096
    proj = ipf.MLPProjModel(cross_attention_dim=4096, id_embeddings_dim=embeds.shape[-1], num_tokens=tokens)
    proj.load_state_dict(sd["image_proj"])
    dit = base.model.diffusion_model
    names = [f"double_blocks.{i}" for i in range(len(dit.double_blocks))]
    names += [f"single_blocks.{i}" for i in range(len(dit.single_blocks))]
    procs = {n: cls(hidden_size=3072, cross_attention_dim=4096, num_tokens=tokens, scale=1.0) for n in names}
    torch.nn.ModuleList(procs.values()).load_state_dict(sd["ip_adapter"])
    holder = types.SimpleNamespace(ip_attn_procs=procs)
    ipf.InstantXFluxIPAdapterModel.update_ip_adapter(holder, base.model, 1.0, (0.0, 1.0))
    model = base
    for i in range(embeds.shape[0]):
        with torch.inference_mode():
            emb = proj(embeds[i:i + 1].float())
        clone = model.clone()
        utils.FluxUpdateModules(clone, procs, emb, utils.is_model_patched(model.model))
        model = clone
    return model


def xflux_peer(base, path: Path, file: Path, embeds: torch.Tensor, inside: Inside):
    """x-flux-comfyui's ApplyFluxIPAdapter on its own copy of the model (its FluxUpdateModules replaces the double
    blocks in place, so the base model keeps ComfyUI's), layers loaded as its LoadFluxIPAdapter does, in the
    model's dtype; returns (patcher, its sampler module)."""
    import comfy.model_patcher
    from safetensors.torch import load_file

    pkg = peer_package("troupe_bench_xflux", path)
    layers = importlib.import_module(f"{pkg}.layers")
    utils = importlib.import_module(f"{pkg}.utils")
    sampling = importlib.import_module(f"{pkg}.sampling")
    ckpt = load_file(str(file))
    blocks = {k[len("double_blocks."):].replace(".processor.", "."): v for k, v in ckpt.items()
              if k.startswith("double_blocks.")}
    proj_sd = {k[len("ip_adapter_proj_model."):]: v for k, v in ckpt.items() if k.startswith("ip_adapter_proj_model")}
    tokens = ckpt["ip_adapter_proj_model.proj.weight"].shape[0] // 4096
    improj = layers.ImageProjModel(4096, embeds.shape[-1], tokens)
    improj.load_state_dict(proj_sd)
    dit = base.model.diffusion_model
    ip_blocks = torch.nn.ModuleList([layers.IPProcessor(4096, 3072) for _ in dit.double_blocks])
    ip_blocks.load_state_dict(blocks)
    own = copy.copy(base.model)  # the peer's own model object and block list, sharing the weights
    own._modules = dict(base.model._modules)
    own_dit = copy.copy(dit)
    own_dit._modules = dict(dit._modules)
    own_dit.double_blocks = torch.nn.ModuleList(list(dit.double_blocks))
    own.diffusion_model = own_dit
    model = comfy.model_patcher.ModelPatcher(own, load_device=base.load_device, offload_device=base.offload_device)
    utils.FluxUpdateModules(model.model)
    with torch.inference_mode():
        projected = improj(embeds.float())
    bi = model.clone()
    ipad_blocks = []
    for block in ip_blocks:
        ipad = layers.IPProcessor(block.context_dim, block.hidden_dim, projected, 1.0)
        ipad.load_state_dict(block.state_dict())
        ipad.in_hidden_states_neg = projected
        ipad.in_hidden_states_pos = projected
        ipad.forward = inside.wrap(ipad.forward)  # the image term, timed like ours
        npp = layers.DoubleStreamMixerProcessor()
        npp.add_ipadapter(ipad)
        ipad_blocks.append(npp)
    for i, name in enumerate(utils.attn_processors(bi.model.diffusion_model)):
        bi.add_object_patch(f"diffusion_model.{name}", utils.merge_loras(None, ipad_blocks[i]))
    return bi, sampling


def xflux_run(model, sampling, context, pooled, size: int, steps: int, tick) -> None:
    """XlabsSampler's path: the patcher loaded (object patches applied), its prepare / get_schedule / denoise,
    guidance 3.5, the negative pass off (cfg 1, as the other rows)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, size // 8, size // 8, generator=gen)
    inp = sampling.prepare(context, pooled, x)
    timesteps = sampling.get_schedule(steps, (size // 8) * (size // 8) // 4, shift=True)
    with torch.inference_mode():
        sampling.denoise(model.model.diffusion_model, **inp, neg_txt=inp["txt"], neg_txt_ids=inp["txt_ids"],
                         neg_vec=inp["vec"], timesteps=timesteps, guidance=3.5, true_gs=1,
                         timestep_to_start_cfg=steps + 1, callback=lambda **kw: tick(), width=size, height=size)


def family(args) -> str:
    """The ``make bench`` FLUX adapter table: base, Troupe with three file formats, the two peers, interleaved."""
    torch.set_num_threads(args.threads)
    double, single = args.double, args.single
    size, n_txt = args.size, args.text
    base = build_model(double, single)  # also sets ComfyUI up, so the pack's nodes import
    from fixtures.flux_adapters import instantx_state_dict, xlabs_state_dict
    from fixtures.tiny_models import flux_conditioning

    from comfyui_troupe.models.adapter_file import detect_and_load, read_state_dict
    from comfyui_troupe.models.flux import adapter as flux_adapter
    from comfyui_troupe.models.flux.patch import FluxInjection
    from comfyui_troupe.nodes.flux import ApplySettings, apply_flux

    width, blocks, n_img = 3072, double + single, (size // 16) ** 2
    pos, neg = flux_conditioning(0, tokens=n_txt), flux_conditioning(1, tokens=n_txt)
    latent = torch.zeros(1, 16, size // 8, size // 8)
    inside_troupe, inside_ix, inside_xl = Inside(), Inside(), Inside()
    kv_bytes: dict = {}

    original_computation = FluxInjection.computation

    def computation(self, run, *a, **kw):  # the term of Eq. 9 inside each block, timed; the run's K/V weighed
        compute = original_computation(self, run, *a, **kw)

        def timed(q):
            out = inside_troupe.wrap(compute)(q)
            if len(run) != kv_bytes.get("entries"):  # a new block's K/V: weigh the run's K/V cache again
                kv_bytes["entries"] = len(run)
                kv_bytes["kv"] = tensor_bytes([v for k, v in run.items() if isinstance(k, tuple) and k[0] == "kv"])
            return out
        return timed

    FluxInjection.computation = computation

    def runner(model, positive=pos):
        return lambda steps, tick: sampler_run(model, positive, neg, latent, steps, tick)


    def kv_cache():
        return kv_bytes.get("kv")

    tmp = Path(tempfile.mkdtemp(prefix="troupe-bench-flux-"))
    ix_file, xl_file = tmp / "ip-adapter.bin", tmp / "flux-ip-adapter.safetensors"
    ix_tokens, xl_tokens, pooled_ix, pooled_xl = 128, 16, 64, 768
    torch.save(instantx_state_dict(pooled=pooled_ix, context=4096, tokens=ix_tokens, hidden=width, layers=blocks),
               ix_file)  # the published nested .bin layout, bf16
    from safetensors.torch import save_file
    save_file(xlabs_state_dict(pooled=pooled_xl, context=4096, tokens=xl_tokens, hidden=width, double=double),
              str(xl_file))

    configs: list = [Config("base (proxy FLUX)", runner(base))]
    n = 3
    from comfyui_troupe.models.flux.injection import token_masks

    rows = int((token_masks(strips(n), size // 8, size // 8) > 0).sum())  # image rows each subject's M_i reaches
    troupe_adapter = build_adapter(double, single)
    m = apply_flux(base, troupe_adapter, flux_features(n, args.tokens, pooled_ix), ApplySettings(), layout=strips(n))
    troupe = Config(f"Troupe, troupe-flux file, {n} subjects x {args.tokens} tokens, strips", runner(m),
                    flops=blocks * attention_flops(rows, args.tokens, width), inside=inside_troupe,
                    cache=kv_cache,
                    formula=f"{blocks} blocks x 4 x {rows} rows x {args.tokens} tokens x {width}: each subject's "
                            f"rows are the image tokens its mask M_i reaches ({n_img} tokens, strip edges in two); "
                            "K/V cached for the run")
    configs.append(troupe)
    ix = detect_and_load(read_state_dict(str(ix_file)), [flux_adapter.FAMILY], filename=ix_file.name)
    ix_feats = flux_features(n, 16, pooled_ix, crop=ix.module.trained_crop)
    m = apply_flux(base, ix, ix_feats, ApplySettings(), layout=strips(n))
    configs.append(Config(
        f"Troupe, InstantX file, {n} subjects x {ix_tokens} tokens, strips", runner(m), inside=inside_troupe,
        cache=kv_cache,
        flops=double * attention_flops(rows, ix_tokens, width) + single * attention_flops(rows + n * n_txt,
                                                                                          ix_tokens, width),
        formula=f"double: 4 x {rows} masked image rows x {ix_tokens} x {width}; single (text and image rows, as "
                f"InstantX): 4 x ({rows} image rows + {n} x {n_txt} text rows) x {ix_tokens} x {width}"))
    if args.peer_instantx is None:
        configs.append(NotRun("peer: InstantX port (ComfyUI-IPAdapter-Flux)", "no --peer-instantx checkout given"))
    else:
        try:
            if args.peer_site is not None:
                sys.path.insert(0, str(args.peer_site))
            pm = instantx_peer(base, args.peer_instantx, ix_file, ix_feats.pooled, inside_ix)
            configs.append(Config(
                f"peer: InstantX port, {n} Apply nodes chained x {ix_tokens} tokens", runner(pm), inside=inside_ix,
                peer=True,
                flops=n * (blocks * kv_projection_flops(ix_tokens, 4096, width)
                           + double * attention_flops(n_img, ix_tokens, width)
                           + single * attention_flops(n_img + n_txt, ix_tokens, width)),
                formula=f"per subject and block: K/V of {ix_tokens} tokens (2 x 2 x {ix_tokens} x 4096 x {width}, every "
                        f"call) + 4 x rows x {ix_tokens} x {width}, rows = {n_img} image (double) or {n_img + n_txt} "
                        "text + image (single): no regions"))
        except ImportError as err:
            configs.append(NotRun("peer: InstantX port", f"import failed ({err}); see --peer-site"))
    xl = detect_and_load(read_state_dict(str(xl_file)), [flux_adapter.FAMILY], filename=xl_file.name)
    xl_feats = flux_features(1, 16, pooled_xl, crop=xl.module.trained_crop)
    m = apply_flux(base, xl, xl_feats, ApplySettings(), layout=strips(1))
    configs.append(Config(
        f"Troupe, XLabs file, 1 subject x {xl_tokens} tokens", runner(m), inside=inside_troupe,
        cache=kv_cache,
        flops=double * attention_flops(n_img, xl_tokens, width),
        formula=f"{double} double blocks x 4 x {n_img} x {xl_tokens} x {width}"))
    if args.peer_xflux is None:
        configs.append(NotRun("peer: x-flux-comfyui", "no --peer-xflux checkout given"))
    else:
        pm, sampling = xflux_peer(base, args.peer_xflux, xl_file, xl_feats.image_embeds, inside_xl)
        context, pooled = pos[0][0], pos[0][1]["pooled_output"]
        configs.append(Config(
            f"peer: x-flux-comfyui, 1 subject x {xl_tokens} tokens (its sampler)",
            lambda steps, tick, pm=pm: xflux_run(pm, sampling, context, pooled, size, steps, tick), inside=inside_xl,
            peer=True, flops=double * (kv_projection_flops(xl_tokens, 4096, width, bias=True)
                                       + attention_flops(n_img, xl_tokens, width)),
            formula=f"per double block: K/V of {xl_tokens} tokens every call + 4 x {n_img} x {xl_tokens} x {width}"))
    base_flops = run_flops(configs[0].run, 1)[0]  # also the warm-up
    if args.count:
        count_added(configs, base_flops)
    interleave([c for c in configs if isinstance(c, Config)], args.rounds, args.steps,
               log=lambda msg: print(msg, file=sys.stderr, flush=True))
    setting = (f"CPU proxy of FLUX.1: ComfyUI's Flux at full width ({width}, 24 heads of 128, MLP x4, T5 width 4096) "
               f"with {double} double + {single} single block(s) instead of 19 + 38, random weights, fp32, "
               f"{args.threads} threads on a shared {os.cpu_count()}-core CPU (no GPU was lent); {size}x{size} "
               f"({n_img} image tokens), {n_txt} text tokens, euler, cfg 1 (one model call per step). Adapter files "
               f"in their published layouts at this width and depth.")
    return family_table("FLUX adapter against the InstantX port and x-flux-comfyui", setting, configs, base_flops,
                        args.rounds, args.steps)


def block_flops(tokens: int, width: int) -> float:
    """One FLUX block (double or single: both are 12 D^2 of weights per token and stream, times 2 FLOP) plus
    its joint attention (QK^T and AV)."""
    return 24 * width ** 2 * tokens + 4 * tokens ** 2 * width


def flops_table(subjects: list[int], ref_tokens: int) -> str:
    """Analytic extra FLOPs of Eq. 9 per step for full FLUX.1 (57 blocks, D 3072) at 1024x1024 with 512 T5
    tokens: each injected row attends to each covering subject's tokens (4 R T D per block)."""
    width, n_txt, n_img, blocks = 3072, 512, 4096, 57
    base = blocks * block_flops(n_txt + n_img, width)
    lines = ["| subjects | layout | injected rows per block | extra TFLOP / step | vs base |",
             "| --- | --- | --- | --- | --- |"]
    for n in subjects:
        for name, rows in (("disjoint strips over the whole image", n_img), ("all subjects everywhere", n * n_img)):
            extra = blocks * 4 * rows * ref_tokens * width
            lines.append(f"| {n} | {name} | {rows} | {extra / 1e12:.2f} | +{100 * extra / base:.1f}% |")
    return f"base: {base / 1e12:.1f} TFLOP / step\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=384, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--text", type=int, default=256, help="T5 tokens")
    ap.add_argument("--double", type=int, default=1, help="double blocks in the proxy (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=2, help="single blocks in the proxy (FLUX.1: 38)")
    ap.add_argument("--subjects", default="1,2,3,4")
    ap.add_argument("--tokens", type=int, default=577, help="reference tokens per subject (ViT-L/14-336: 577)")
    ap.add_argument("--repeats", type=int, default=5, help="timed base / patched step pairs after the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flops-only", action="store_true", help="print the analytic full-size table and stop")
    ap.add_argument("--family", action="store_true", help="the make-bench table: Troupe and the peers, interleaved")
    ap.add_argument("--quick", action="store_true", help="with --family: 1 + 1 blocks, 384 px, 2 rounds of 2 steps")
    ap.add_argument("--rounds", type=int, default=None, help="with --family: interleaved rounds (default 3; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="with --family: steps per run (default 3; quick 2)")
    ap.add_argument("--count", action="store_true", help="with --family: also count each row's FLOPs with torch")
    ap.add_argument("--peer-instantx", type=Path, default=None, help="checkout of Shakker-Labs/ComfyUI-IPAdapter-Flux")
    ap.add_argument("--peer-xflux", type=Path, default=None, help="checkout of XLabs-AI/x-flux-comfyui")
    ap.add_argument("--peer-site", type=Path, default=None, help="extra import path for the peers' packages (diffusers)")
    args = ap.parse_args()
    if args.family:
        given = set(sys.argv[1:])
        if args.quick:  # 1 + 1 blocks, 384 px, 128 text tokens unless given
            args.double, args.single = 1, 1
            args.text = args.text if "--text" in given else 128
        else:
            args.size = args.size if "--size" in given else 512
        args.rounds = args.rounds or (2 if args.quick else 3)
        args.steps = args.steps or (2 if args.quick else 3)
        print(family(args))
        return
    torch.set_num_threads(args.threads)
    subjects = [int(s) for s in args.subjects.split(",")]
    print("analytic, full FLUX.1 at 1024x1024 (57 blocks, 4096 image + 512 text tokens, "
          f"{args.tokens} reference tokens per subject):")
    print(flops_table(subjects, args.tokens) + "\n", flush=True)
    if args.flops_only:
        return

    base = build_model(args.double, args.single)
    adapter = build_adapter(args.double, args.single)
    gen = torch.Generator().manual_seed(0)
    lat = args.size // 8
    inputs = (torch.randn(1, 16, lat, lat, generator=gen), torch.full((1,), 0.7),
              torch.randn(1, args.text, 4096, generator=gen), torch.randn(1, 768, generator=gen))
    params = sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e9
    print(f"proxy: FLUX.1 width 3072 / 24 heads / context 4096, {args.double} double + {args.single} single blocks "
          f"({params:.2f} B parameters, fp32, CPU, {args.threads} threads); {args.size}x{args.size} "
          f"({(lat // 2) ** 2} image tokens), {args.text} text tokens; {args.tokens} reference tokens per subject",
          flush=True)

    from comfyui_troupe.nodes.lifecycle import model_call_scope

    for _ in range(2):
        step(base, *inputs)  # warm-up (allocator, kernels, page cache)
    rows = []
    for n in subjects:
        model = patched_model(base, adapter, n, args.tokens, 1024)
        with model_call_scope(model) as run_options:  # one run: its K/V are built on the first step, then kept
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                step(model, *inputs, run_options)  # the run's first step: K/V of every block and the masks
                first = time.perf_counter() - t0
            wb, wp, cb, cp, mb, mp = [], [], [], [], 0, mem.growth
            for _ in range(args.repeats):  # base and patched alternate, so drift hits both alike
                for target, wall, cpu in ((base, wb, cb), (model, wp, cp)):
                    with PeakRSS() as mem:
                        t0, c0 = time.perf_counter(), time.process_time()
                        step(target, *inputs, run_options if target is model else None)
                        wall.append(time.perf_counter() - t0)
                        cpu.append(time.process_time() - c0)
                    if target is base:
                        mb = max(mb, mem.growth)
                    else:
                        mp = max(mp, mem.growth)
        rows.append((n, first, min(wb), min(wp), min(cb), min(cp), mb, mp))  # fastest of N: least disturbed
        del model
        print(f"  {n} subjects done", flush=True)
    print("\n| subjects | first patched step, wall s (incl. K/V) | base CPU s / step | patched CPU s / step | "
          "CPU time vs base | wall time vs base | base peak RSS growth (MiB) | patched (MiB) | memory vs base |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, first, wb, wp, cb, cp, mb, mp in rows:
        print(f"| {n} | {first:.2f} | {cb:.2f} | {cp:.2f} | {cp / cb:.3f} | {wp / wb:.3f} | {mb / 2**20:.0f} | "
              f"{mp / 2**20:.0f} | {mp / max(mb, 1):.2f} |")


if __name__ == "__main__":
    main()
