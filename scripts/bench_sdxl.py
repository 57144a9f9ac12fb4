"""Per-step cost of TroupeApplySDXL's regional patch vs the base SDXL UNet, in one run.

The full-size SDXL UNet architecture (ComfyUI's own classes, 2.57 B parameters, random weights) at
512x512 (64x64 latent), one UNet forward per configuration (a sampler step on the cond branch), for
1, 2, 4, 8 subjects with all four token levels (an R^3 file: refiner + router), joint semantics. The
per-run work (K/V of every layer, masks per resolution) is built before the timed forward, as the patch
does on a run's first call, and reported on its own. The CPU is shared, so rounds are interleaved and
the time spent inside the image-attention term is also measured within each patched forward (its share
of that same step is robust to the machine's load). Peak memory is the largest resident-set growth
during the forward (sampled every 5 ms), since CPU torch has no allocator statistics.

Run: .host/venv/bin/python scripts/bench_sdxl.py [--size 512] [--subjects 1,2,4,8] [--repeats 1]
Prints a markdown table (the README's ``### Measured``).

``--family [--quick] [--peer DIR]`` (what ``make bench`` runs): one table of the standard benchmark columns through
ComfyUI's sampler (cfg 1): base, TroupeApplySDXL's patch with an R^3 file (4 subjects x 4 levels x 16 tokens,
joint, every layer) and cubiq's IPAdapter_plus chained once per masked subject with 4 tokens (IP-Adapter) and 16
tokens (IP-Adapter Plus, the pack's count per level). ``--quick``: the UNet with transformer depth 1 in every
block (11 attention layers, full widths) at 256 px; otherwise the full-size UNet at 512 px (about 14 GB of memory).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time
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
    profile_added,
    run_flops,
    sampler_run,
    tensor_bytes,
)

FULL_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


QUICK_SDXL_UNET = dict(FULL_SDXL_UNET, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                       transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])


def attention_layers(config: dict, latent: int) -> list[tuple[int, int]]:
    """(pixel tokens, width) of every cross-attention layer of an SDXL-style UNet config at a ``latent`` side:
    level l has width model_channels x channel_mult[l] at (latent / 2^l)^2 tokens; ``transformer_depth`` entries
    2l, 2l + 1 and ``transformer_depth_output`` entries 3l .. 3l + 2 belong to level l (ComfyUI's UNet pops the
    output depths from the end: output block 0, the deepest, takes the last entry), the middle block to the last."""
    mults, ch = config["channel_mult"], config["model_channels"]
    depth_in, depth_out, levels = config["transformer_depth"], config["transformer_depth_output"], len(mults)
    out = []
    for level in range(levels):
        tokens, width = (latent // 2 ** level) ** 2, ch * mults[level]
        count = sum(depth_in[2 * level:2 * level + 2])
        count += sum(depth_out[3 * level:3 * level + 3])
        if level == levels - 1:
            count += config["transformer_depth_middle"]
        out += [(tokens, width)] * count
    return out


def regional_flops(layers: list[tuple[int, int]], covered, tokens: int) -> float:
    """The joint regional image term on every layer: each pixel attends to the ``tokens`` tokens of every subject
    whose region reaches it, so a layer of P pixels costs 4 x covered(P) x tokens x width, with ``covered(P)`` the
    number of (pixel, subject) pairs at that grid (K/V cached for the run)."""
    return sum(attention_flops(covered(p), tokens, w) for p, w in layers)


def ipadapter_flops(layers: list[tuple[int, int]], subjects: int, tokens: int, context: int = 2048) -> float:
    """IPAdapter_plus, one masked patch per subject on every layer it patches: each call projects the subject's
    K/V from its ``tokens`` cond tokens and from its ``tokens`` uncond tokens (both, whatever the batch holds), and
    attends every pixel to them (the mask multiplies the output afterwards)."""
    return subjects * sum(2 * kv_projection_flops(tokens, context, w) + attention_flops(p, tokens, w)
                          for p, w in layers)


def build_unet(config: dict = FULL_SDXL_UNET):
    from fixtures.tiny_models import _patcher, ensure_comfy, init_weights

    ensure_comfy()
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(config))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    init_weights(model.diffusion_model, seed=0)
    return _patcher(model)


def build_adapter(widths: dict, levels: int = 4):
    """An R^3 adapter with random weights: to_k_ip / to_v_ip for every cross-attention layer of the UNet (70 for
    the full-size one, 11 for transformer depth 1), the router."""
    from comfyui_troupe.models.sdxl.adapter import SdxlAdapter, depths_for, sdxl_layer_keys
    from comfyui_troupe.models.sdxl.refiner import RefinerConfig

    keys = sdxl_layer_keys(depths_for(len(widths)))
    module = SdxlAdapter("troupe-r3", layer_widths=[widths[k][1] for k in keys], linear=(1280, 16),
                         refiner=RefinerConfig() if levels == 4 else None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("layers."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name == "dummy_image_tokens":
                p.copy_(torch.randn(p.shape, generator=gen))
    return module


def peer_model(base, adapter, peer_dir: Path, boxes, size: int, sigma_start: float, wrap=lambda fn: fn,
               tokens: int = 4):
    """cubiq's IPAdapter_plus Attn2Replace chained once per masked subject, keyed the way that pack keys SDXL
    (its middle block key ("middle", 1, i) is never looked up by ComfyUI, so it patches 60 of the 70 layers)."""
    import importlib
    import types

    pkg = types.ModuleType("troupe_bench_peer")
    pkg.__path__ = [str(peer_dir)]
    sys.modules["troupe_bench_peer"] = pkg
    cap = importlib.import_module("troupe_bench_peer.CrossAttentionPatch")
    from comfyui_troupe.models.layout.layout import render_box
    from comfyui_troupe.models.sdxl.adapter import depths_for, sdxl_layer_keys

    class PeerAdapter:
        def __init__(self):
            self.ip_layers = types.SimpleNamespace(to_kvs=torch.nn.ModuleDict(
                {f"{k}_to_{kv}_ip": getattr(layer, f"to_{kv}_ip") for k, layer in adapter.layers.items()
                 for kv in ("k", "v")}))

        def get_multigpu_clone(self, device):
            return self

    ipa = PeerAdapter()
    callback = wrap(cap.ipadapter_attention)  # the per-subject image term, timed like ours
    gen = torch.Generator().manual_seed(2)
    subjects = [{"ipadapter": ipa, "weight": 0.6, "cond": torch.randn(1, tokens, 2048, generator=gen),
                     "uncond": torch.zeros(1, tokens, 2048), "cond_alt": None, "weight_type": "linear",
                     "mask": render_box(b, size // 8, size // 8)[None], "sigma_start": sigma_start, "sigma_end": 0.0,
                     "unfold_batch": False, "embeds_scaling": "V only"} for b in boxes]
    m = base.clone()
    for number, (block, idx, j) in enumerate(sdxl_layer_keys(depths_for(len(adapter.layers)))):
        patch = None
        for kw in subjects:
            kw = dict(kw, module_key=str(number * 2 + 1))
            if patch is None:
                patch = cap.Attn2Replace(callback, **kw)
            else:
                patch.add(callback, **kw)
        m.set_model_attn2_replace(patch, block, 1 if block == "middle" else idx, j)
    return m


def forward(patcher, x, sigma, context, y, run_options=None):
    """One UNet evaluation as the sampler makes it (transformer options with sigmas and cond_or_uncond);
    ``run_options``: the options of a run (``lifecycle.model_call_scope``), so the per-run cache is kept."""
    to = dict(run_options if run_options is not None else patcher.model_options["transformer_options"])
    to.update(sigmas=sigma, cond_or_uncond=[0], sample_sigmas=sigma)
    with torch.inference_mode():
        t = patcher.model.model_sampling.timestep(sigma).float()
        return patcher.model.diffusion_model(x, t, context=context, y=y, transformer_options=to)


def family(args) -> str:
    """The ``make bench`` SDXL table: base, the R^3 patch, IPAdapter_plus with 4 and 16 tokens, interleaved."""
    config = QUICK_SDXL_UNET if args.quick else FULL_SDXL_UNET
    base = build_unet(config)  # also sets ComfyUI up, so the pack's nodes import
    import comfy.ldm.modules.attention as comfy_attention
    from fixtures.tiny_models import sdxl_conditioning

    from comfyui_troupe.models.layout.layout import Layout, Region, render_box
    from comfyui_troupe.models.sdxl.patch import RegionalAttentionPatch, RegionalParams, layer_keys_for
    from comfyui_troupe.models.sdxl.router import router_time
    from comfyui_troupe.nodes import lifecycle
    from comfyui_troupe.nodes import sdxl as node

    adapter = build_adapter(node.attention_widths(base))
    size, lat, n = args.size, args.size // 8, 4
    layers = attention_layers(config, lat)
    pos, neg = sdxl_conditioning(0, width=size, height=size), sdxl_conditioning(1, width=size, height=size)
    latent = torch.zeros(1, 4, lat, lat)
    sampling = base.get_model_object("model_sampling")
    boxes = [((i % 4) / 4, (i // 4) / 2, min(1.0, (i % 4) / 4 + 0.3), min(1.0, (i // 4) / 2 + 0.55)) for i in range(n)]
    coverage = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes)
    def covered(pixels: int) -> int:  # (pixel, subject) pairs the regions reach at a square grid of ``pixels``
        side = math.isqrt(pixels)
        return sum(int((render_box(b, side, side) > 0).sum()) for b in boxes)

    gen = torch.Generator().manual_seed(0)
    inside, peer_inside, kv = Inside(), Inside(), {}

    def runner(model):
        return lambda steps, tick: sampler_run(model, pos, neg, latent, steps, tick)


    layout = Layout(size, size, tuple(Region(box=b) for b in boxes))
    patch = RegionalAttentionPatch(adapter, torch.randn(n, 4, 16, 2048, generator=gen), layout,
                                   RegionalParams(weight=0.6, blocks="all", routing="learned"),
                                   attention=comfy_attention.optimized_attention,
                                   sigma_to_t=functools.partial(router_time, sampling))
    original = patch.projections

    def projections(run, *a, **kw):  # the run's K/V cache, weighed when a layer adds to it
        out = original(run, *a, **kw)
        if len(run) != kv.get("entries"):
            kv["entries"], kv["bytes"] = len(run), tensor_bytes([v for k, v in run.items() if k[0] == "kv"])
        return out

    patch.projections = projections
    patch.image_attention = inside.wrap(patch.image_attention)
    m = lifecycle.install(base, patch, "sdxl", attn2=layer_keys_for(adapter, "all"))
    configs: list = [Config("base (SDXL UNet)", runner(base)), Config(
        f"Troupe, R^3 file, {n} subjects x 4 levels x 16 tokens, joint", runner(m), inside=inside,
        flops=regional_flops(layers, covered, 64), cache=lambda: kv.get("bytes"),
        formula=f"{len(layers)} layers: 4 x (pixel, subject) pairs the regions reach (about {coverage:.2f} x pixels) "
                "x 64 tokens x width")]
    if args.peer is None:
        configs.append(NotRun("peer: IPAdapter_plus", "no --peer-ipadapter-plus checkout given"))
    else:
        for tokens in (4, 16):
            pm = peer_model(base, adapter, args.peer, boxes, size, sampling.percent_to_sigma(0.0),
                            wrap=peer_inside.wrap, tokens=tokens)
            last = (lat // 2 ** (len(config["channel_mult"]) - 1)) ** 2
            patched = list(layers)  # every layer but the middle block's: that key ComfyUI never looks up
            for _ in range(config["transformer_depth_middle"]):
                patched.remove((last, config["model_channels"] * config["channel_mult"][-1]))
            configs.append(Config(
                f"peer: IPAdapter_plus, {n} chained masked subjects x {tokens} tokens", runner(pm),
                inside=peer_inside, peer=True, flops=ipadapter_flops(patched, n, tokens),
                formula=f"{len(patched)} layers (its middle-block key is never looked up) x {n} subjects: K/V of "
                        f"{tokens} cond and {tokens} uncond tokens every call (2 x 2 x 2 x {tokens} x 2048 x width) + "
                        f"4 x pixels x {tokens} x width"))
    base_flops = 0.0 if args.profile else run_flops(configs[0].run, 1)[0]  # also the warm-up
    if args.count:
        count_added(configs, base_flops)
    if args.profile:
        return profile_added(configs[0].run, configs[1].run, steps=2)
    interleave([c for c in configs if isinstance(c, Config)], args.rounds, args.steps,
               log=lambda msg: print(msg, file=sys.stderr, flush=True))
    params = sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e9
    setting = (f"{'Quick: the SDXL UNet with transformer depth 1 in every block' if args.quick else 'Full-size SDXL UNet'}"
               f" ({params:.2f} B parameters, {len(layers)} cross-attention layers, ComfyUI's own classes, random "
               f"weights), {size}x{size}, fp32, {torch.get_num_threads()} torch thread(s) on a shared "
               f"{os.cpu_count()}-core CPU (no GPU was lent); euler, cfg 1 (one UNet call per step); {n} subjects in "
               f"overlapping boxes covering {coverage:.2f} image areas in total; the peer from a checkout outside the "
               "repository, its adapter layers the R^3 file's to_k_ip / to_v_ip.")
    return family_table("SDXL adapter against IPAdapter_plus", setting, configs, base_flops, args.rounds, args.steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--subjects", default="1,2,4,8")
    ap.add_argument("--blocks", default="all", help="patched blocks: all (MS-Diffusion) or down+mid (A.2 of 000)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: keep 1, the test harness setting)")
    ap.add_argument("--peer", type=Path, default=None,
                    help="a checkout of cubiq/ComfyUI_IPAdapter_plus OUTSIDE this repository: also time what users do "
                         "today, one masked IP-Adapter patch per subject (4 subjects x 4 tokens), in the same rounds")
    ap.add_argument("--family", action="store_true", help="the make-bench table: Troupe and the peer, interleaved")
    ap.add_argument("--quick", action="store_true", help="with --family: transformer depth 1, 2 rounds of 2 steps")
    ap.add_argument("--rounds", type=int, default=None, help="with --family: interleaved rounds (default 3; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="with --family: steps per run (default 3; quick 2)")
    ap.add_argument("--count", action="store_true", help="with --family: also count each row's FLOPs with torch")
    ap.add_argument("--profile", action="store_true",
                    help="with --family: torch.profiler on a base step and a steady Troupe step, added time per operator")
    args = ap.parse_args()
    if args.threads and not args.family:
        torch.set_num_threads(args.threads)
    if args.family:
        given = set(sys.argv[1:])
        args.size = args.size if "--size" in given or not args.quick else 256
        torch.set_num_threads(args.threads or 2)
        args.rounds = args.rounds or (2 if args.quick else 3)
        args.steps = args.steps or (2 if args.quick else 3)
        print(family(args))
        return 0

    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    import comfy.ldm.modules.attention as comfy_attention

    from comfyui_troupe.models.layout.grid import grid_of_tokens
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.models.sdxl.patch import RegionalAttentionPatch, RegionalParams, layer_keys_for
    from comfyui_troupe.models.sdxl.router import router_time
    from comfyui_troupe.nodes import lifecycle
    from comfyui_troupe.nodes import sdxl as node

    t0 = time.perf_counter()
    base = build_unet()
    widths = node.attention_widths(base)
    adapter = build_adapter(widths)
    print(f"[bench] built full-size SDXL UNet ({sum(p.numel() for p in base.model.parameters()) / 1e9:.2f} B "
          f"parameters) and R^3 adapter in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}",
          flush=True)
    lat = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, lat, lat, generator=gen)
    context = torch.randn(1, 77, 2048, generator=gen)
    y = torch.randn(1, 2816, generator=gen)
    sampling = base.get_model_object("model_sampling")
    sigma = sampling.percent_to_sigma(0.3) * torch.ones(1)

    spent = {}  # seconds inside the image-attention term during the last forward, per patched model

    def timed(patcher, name):
        spent[name] = 0.0
        with PeakRSS() as peak:
            t = time.perf_counter()
            forward(patcher, x, sigma, context, y, run_options.get(name))
            return time.perf_counter() - t, peak.growth

    def timing(name, fn):
        def wrapped(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            spent[name] += time.perf_counter() - t
            return out
        return wrapped

    counts = [int(s) for s in args.subjects.split(",")]
    models, setups, run_options = {}, {}, {}
    scopes = contextlib.ExitStack()  # one run per patched model, held over all rounds (its cache built once)
    for n in counts:
        boxes = [((i % 4) / 4, (i // 4) / 2, (i % 4) / 4 + 0.3, (i // 4) / 2 + 0.55) for i in range(n)]
        layout = Layout(args.size, args.size, tuple(Region(box=tuple(min(v, 1.0) for v in b)) for b in boxes))
        tokens = torch.randn(n, 4, 16, 2048, generator=gen)
        params = RegionalParams(weight=0.6, blocks=args.blocks, routing="learned")
        patch = RegionalAttentionPatch(adapter, tokens, layout, params, attention=comfy_attention.optimized_attention,
                                       sigma_to_t=functools.partial(router_time, sampling))
        keys = layer_keys_for(adapter, args.blocks)
        m = lifecycle.install(base, patch, "sdxl", attn2=keys)
        run_options[n] = scopes.enter_context(lifecycle.model_call_scope(m))
        run = next(iter(run_options[n][lifecycle.RUNS].values())).cache
        t = time.perf_counter()
        with torch.inference_mode():  # what the first call of a run builds: K/V per layer, masks per grid
            for k in keys:
                patch.projections(run, k, x.device, x.dtype)
            for f in (2, 4):
                patch.masks(run, *grid_of_tokens((lat // f) ** 2, lat, lat), x.device)
        cache = sum(v.numel() * v.element_size() for e in run.values() if isinstance(e, dict)
                    for v in e.values() if isinstance(v, torch.Tensor))
        setups[n] = (time.perf_counter() - t, cache, len(keys))
        patch.image_attention = timing(n, patch.image_attention)
        models[n] = m

    runs = [("base", base)] + [(n, models[n]) for n in counts]
    if args.peer is not None:
        boxes = [((i % 4) / 4, (i // 4) / 2, (i % 4) / 4 + 0.3, (i // 4) / 2 + 0.55) for i in range(4)]
        runs.append(("peer", peer_model(base, adapter, args.peer, boxes, args.size, sampling.percent_to_sigma(0.0),
                                        wrap=lambda fn: timing("peer", fn))))

    # interleaved rounds (base, 1, 2, 4, 8, base, ...): the CPU is shared, so drift hits every config alike
    times: dict = {"base": []}
    mems: dict = {"base": []}
    shares: dict = {}
    for r in range(args.repeats):
        for name, m in runs:
            s, mem = timed(m, name)
            times.setdefault(name, []).append(s)
            mems.setdefault(name, []).append(mem)
            if name != "base":
                shares.setdefault(name, []).append(spent[name] / s)
            print(f"[bench] round {r + 1} {name}: {s:.2f} s, peak +{mem / 2**20:.0f} MiB"
                  + (f", image attention {spent[name]:.2f} s" if name != "base" else ""), flush=True)
    scopes.close()
    base_s, base_mem = min(times["base"]), max(mems["base"])
    rows = [(n, min(times[n]), max(mems[n]), sorted(shares[n])[len(shares[n]) // 2], *setups[n]) for n in counts]

    print()
    print(f"Full-size SDXL UNet (random weights), {args.size}x{args.size}, fp32, CPU "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), one cond forward per config, "
          f"best of {args.repeats} interleaved rounds; R^3 adapter with 4 levels x 16 tokens per subject, "
          f"joint attention, blocks '{args.blocks}'.")
    print()
    print("| subjects | patched layers | s / step (best) | vs base | image-attention share of the step (median) "
          "| peak memory growth in the step | vs base | per-run setup (K/V cache) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| base | 0 | {base_s:.2f} | - | - | {base_mem / 2**20:.0f} MiB | - | - |")
    for n, s, mem, share, setup, cache, nk in rows:
        print(f"| {n} | {nk} | {s:.2f} | {(s / base_s - 1) * 100:+.1f}% | {share * 100:.1f}% | {mem / 2**20:.0f} MiB "
              f"| {(mem - base_mem) / 2**20:+.0f} MiB | {setup:.2f} s ({cache / 2**20:.0f} MiB) |")
    if "peer" in times:
        s, mem = min(times["peer"]), max(mems["peer"])
        share = sorted(shares["peer"])[len(shares["peer"]) // 2]
        print(f"| peer: IPAdapter_plus, 4 chained masked subjects x 4 tokens | 60 | {s:.2f} | "
              f"{(s / base_s - 1) * 100:+.1f}% | {share * 100:.1f}% | {mem / 2**20:.0f} MiB | "
              f"{(mem - base_mem) / 2**20:+.0f} MiB | K/V per call |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
