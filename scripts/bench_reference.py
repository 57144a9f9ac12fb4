"""Benchmark: per-step time and peak memory of the FLUX reference branch against the base model.

CPU proxy (no GPU here): ComfyUI's own FLUX DiT at FULL width (hidden 3072, 24 heads, MLP 12288, T5 width
4096, RoPE axes 16/56/56) but REDUCED depth (default 1 double + 1 single block instead of 19 + 38), random
weights, fp32, 256 text tokens. References are 512-px images (32 x 32 = 1024 tokens each, MOSAIC's size) with
a MOSAIC-layout LoRA of rank 512 (MOSAIC's ``subject_512.safetensors`` rank), ``reference_attention=joint``.

One process builds the model once; for each image size it runs one untimed base step at that size, then
for each reference count one base sampler step and one patched step back to back (ComfyUI's sampler, euler, cfg 1), so both see the same machine load; the
base time is the median of its runs at that size. Peak memory is the largest growth of the process's
resident set during a step, sampled every 5 ms (CPU torch has no allocator statistics), so it counts
activations and the reference stream, not the weights. Absolute seconds are this shared 2-core machine's;
read the ratios.

Usage: ``.host/venv/bin/python scripts/bench_reference.py [--sizes 512 1024] [--refs 1 2 3 4]``

``--family [--quick]`` (what ``make bench`` runs): one table of the standard benchmark columns for 4 references
of 512 px (1024 tokens each; quick: 256 px, 256 tokens) on a 512-px image: base, ``self_cached`` (steady step
apart from its first-step setup), ``joint`` (not in quick mode) and ComfyUI's own ``ReferenceLatent`` (FLUX Kontext
multi-reference) with the same references, interleaved in rounds of sampling runs. ``--profile``: torch.profiler
on a base step and a steady ``self_cached`` step, the added CPU time per operator.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import (
    Config,
    PeakRSS,
    attention_flops,
    count_added,
    family_table,
    interleave,
    profile_added,
    reference_latent_flops,
    reference_self_cached_flops,
    run_flops,
    sampler_run,
    tensor_bytes,
)


def measure(fn) -> tuple[float, float]:
    """(seconds, peak resident-set growth in MiB) of one call."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return dt, max(0, mem.growth) / 2**20




def build(double: int, single: int):
    """The full-width, reduced-depth FLUX proxy as a ComfyUI ModelPatcher (uniform random weights)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401  (registers the pack as comfyui_troupe)
    from fixtures import tiny_models as tm

    tm.ensure_comfy()
    import comfy.supported_models

    unet = dict(tm.TINY_FLUX_DIT, hidden_size=3072, num_heads=24, depth=double, depth_single_blocks=single,
                axes_dim=[16, 56, 56])
    cfg = comfy.supported_models.Flux(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    torch.manual_seed(0)
    with torch.no_grad():  # uniform fill: much faster than the fixtures' seeded normal at 3 GB, same role
        for mod in model.diffusion_model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if "Norm" in type(mod).__name__:
                    p.fill_(0.0 if name == "bias" else 1.0)
                else:
                    p.uniform_(-0.03, 0.03)
    return tm._patcher(model), tm


def reference_latents(refs: int, size: int = 512):
    """``refs`` random 16-channel latents of ``size``-px references (seeded): [16, size/8, size/8] each."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, size // 8, size // 8, generator=g) for _ in range(refs)]


def patched_model(base, refs: int, rank: int, attention: str, ref_px: int = 512):
    import comfy.ldm.flux.math
    import torch

    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions
    from comfyui_troupe.models.reference.lora import FluxDims, load_reference_lora, mosaic_targets
    from comfyui_troupe.nodes.reference_branch import install_branch

    dit = base.model.diffusion_model
    lats = reference_latents(refs, ref_px)
    g = torch.Generator().manual_seed(2)
    dims = FluxDims.from_model(dit)
    sd = {}
    for name, (_m, _off, rows, fin) in mosaic_targets(dims).items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=g) * 0.01
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.01
    branch = ReferenceBranch(dit=dit, latents=lats, ref_subject=list(range(refs)),
                             options=ReferenceOptions(attention=attention), lora=load_reference_lora(sd, dims))
    return install_branch(base, branch, comfy.ldm.flux.math.attention)


def attention_rates(heads: int, head_dim: int, queries: int, extra_keys: int, repeats: int = 3) -> tuple[float, ...]:
    """CPU seconds of ComfyUI's FLUX attention (``comfy.ldm.flux.math.attention``: the host's backend, RoPE included)
    for ``queries`` rows over the base's own keys and over them plus ``extra_keys`` cached keys (median of
    ``repeats``, interleaved), and the backend's name: the rate the added work of ``self_cached`` actually runs at."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as comfy_attention
    import torch
    from comfy.ldm.flux.layers import EmbedND

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, queries, head_dim, generator=g) for _ in range(3))
    rk, rv = (torch.randn(1, heads, extra_keys, head_dim, generator=g) for _ in range(2))
    pe = EmbedND(dim=head_dim, theta=10000, axes_dim=[16, 56, 56])(torch.zeros(1, queries, 3))
    own, joint = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.process_time()
            flux_math.attention(q, k, v, pe=pe)
            own.append(time.process_time() - t)
            t = time.process_time()
            flux_math.attention(q, torch.cat((k, rk), 2), torch.cat((v, rv), 2), pe=None)
            joint.append(time.process_time() - t)
    return statistics.median(own), statistics.median(joint), comfy_attention.optimized_attention.__name__


def family(args) -> str:
    """The ``make bench`` table: base, self_cached, joint (full mode) and ReferenceLatent, interleaved."""
    import torch

    torch.set_num_threads(args.threads)
    base, tm = build(args.double, args.single)
    import node_helpers  # ComfyUI's, importable once build() has set ComfyUI up

    from comfyui_troupe.models.reference import hooks
    dit = base.model.diffusion_model
    width, blocks = dit.hidden_size, args.double + args.single
    size, refs, ref_px = 512, 4, args.ref_size
    per_ref = (ref_px // 16) ** 2
    ref_tokens = refs * per_ref
    n_img = (size // 16) ** 2
    pos, neg = tm.flux_conditioning(0, tokens=args.text), tm.flux_conditioning(1, tokens=args.text)
    latent = torch.zeros(1, 16, size // 8, size // 8)
    caches: dict = {}

    def cached_kv(*a, **kw):  # the self_cached K/V a run builds, weighed as it is made
        kv = original_kv(*a, **kw)
        caches["self_cached"] = tensor_bytes(kv)
        return kv

    original_kv = hooks.self_cached_kv
    hooks.self_cached_kv = cached_kv

    def runner(model, positive=pos):
        return lambda steps, tick: sampler_run(model, positive, neg, latent, steps, tick)


    kontext = [[c, dict(extra)] for c, extra in pos]
    for lat in reference_latents(refs, ref_px):  # what the ReferenceLatent node does, once per reference
        kontext = node_helpers.conditioning_set_values(kontext, {"reference_latents": [lat[None]]}, append=True)
    configs = [Config("base (proxy FLUX, no references)", runner(base))]
    modes = [m for m in args.modes.split(",") if m]
    rows = args.text + n_img
    for mode in modes:
        m = patched_model(base, refs, args.rank, mode, ref_px)
        if mode == "self_cached":
            configs.append(Config(
                f"Troupe reference branch, self_cached, {refs} refs x {per_ref} tokens", runner(m),
                flops=reference_self_cached_flops(rows, ref_tokens, width, blocks),
                cache=lambda: caches.get("self_cached"),
                formula=f"{blocks} blocks x 4 x ({args.text} text + {n_img} image queries) x {ref_tokens} cached "
                        f"reference keys x {width} (attention only; the references' own pass is setup)"))
        else:
            configs.append(Config(
                f"Troupe reference branch, joint, {refs} refs x {per_ref} tokens", runner(m),
                flops=reference_latent_flops(n_img, args.text, ref_tokens, width, blocks),
                formula=f"as ReferenceLatent: every block on text + image + {ref_tokens} reference tokens (LoRA left "
                        "out)"))
    configs.append(Config(
        f"peer: ComfyUI ReferenceLatent x {refs} (Kontext style), {per_ref} tokens each", runner(base, kontext),
        peer=True,
       
        flops=reference_latent_flops(n_img, args.text, ref_tokens, width, blocks),
        formula=f"{blocks} x (block(n + {ref_tokens}) - block(n)), n = {rows} tokens, block(n) = 24 n D^2 + 4 n^2 D"))
    base_flops = run_flops(configs[0].run, 1)[0]  # also the warm-up
    if args.count:
        count_added(configs, base_flops)
    interleave(configs, args.rounds, args.steps, log=lambda m: print(m, file=sys.stderr, flush=True))
    setting = (f"CPU proxy of FLUX.1: ComfyUI's Flux at full width ({width}, 24 heads, MLP x4, T5 width 4096), "
               f"{args.double} double + {args.single} single block(s) instead of 19 + 38, random weights, fp32, "
               f"{args.threads} threads on a shared {os.cpu_count()}-core CPU (no GPU was lent); {size}x{size} image "
               f"({n_img} tokens), {args.text} text tokens, {refs} references of {ref_px} px ({per_ref} tokens each), rank-"
               f"{args.rank} MOSAIC-layout LoRA, euler, cfg 1 (one model call per step).")
    cached = next((c for c in configs if "self_cached" in c.name), None)
    if cached is None:
        return family_table("Reference branch (FLUX) against ComfyUI's ReferenceLatent", setting, configs, base_flops,
                            args.rounds, args.steps)
    own_s, joint_s, backend = attention_rates(24, width // 24, rows, ref_tokens)
    own_rate = attention_flops(rows, rows, width) / own_s
    added_attention = joint_s - own_s
    steady_added = statistics.median([s - b for s, b in zip(cached.steady, configs[0].steady)])
    step_rate = base_flops / statistics.median(configs[0].steady)
    note = (f"\nWhere the self_cached time goes: its added work is attention only, and ComfyUI's attention backend "
            f"on this host (`{backend}`) ran one block's base attention ({rows} queries and keys) at "
            f"{own_rate / 1e9:.1f} GFLOP per CPU second, against {step_rate / 1e9:.1f} for the base step as a whole "
            f"(its linear layers). Timed alone, one block's attention over the {ref_tokens} extra cached keys adds "
            f"{added_attention:.2f} CPU s ({blocks} blocks: {blocks * added_attention:.2f} s, against "
            f"{steady_added:.2f} s measured in the step); at the backend's own rate the FLOP estimate is "
            f"{cached.flops / own_rate:.2f} s, so measured / estimate = {steady_added / (cached.flops / own_rate):.2f}."
            " `python scripts/bench_reference.py --profile` shows the step per operator (torch.profiler).\n")
    return family_table("Reference branch (FLUX) against ComfyUI's ReferenceLatent", setting, configs, base_flops,
                        args.rounds, args.steps) + note


def profile(args) -> str:
    """torch.profiler on a base step and on a steady self_cached step (the second of a run): where the added time
    goes, per operator (self CPU time)."""
    import torch

    torch.set_num_threads(args.threads)
    base, tm = build(args.double, args.single)
    pos, neg = tm.flux_conditioning(0, tokens=args.text), tm.flux_conditioning(1, tokens=args.text)
    latent = torch.zeros(1, 16, 64, 64)
    model = patched_model(base, 4, args.rank, "self_cached", args.ref_size or 512)
    return profile_added(lambda steps, tick: sampler_run(base, pos, neg, latent, steps, tick),
                         lambda steps, tick: sampler_run(model, pos, neg, latent, steps, tick), steps=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--refs", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--attention", default="joint", choices=["joint", "self_cached"])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None,
                    help="sampler steps per measured run (time is per step; default 1, with --family 3, quick 2)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--family", action="store_true", help="the make-bench table (4 references, peers, setup apart)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler: base step vs steady self_cached step")
    ap.add_argument("--quick", action="store_true", help="with --family: no joint row, 2 rounds of 2-step runs")
    ap.add_argument("--rounds", type=int, default=None, help="with --family: interleaved rounds (default 3; quick 2)")
    ap.add_argument("--modes", default=None, help="with --family: reference_attention rows (self_cached,joint; "
                                                  "quick: self_cached)")
    ap.add_argument("--ref-size", type=int, default=None, help="with --family: reference side in px (512; quick 256)")
    ap.add_argument("--count", action="store_true", help="with --family: also count each row's FLOPs with torch")
    args = ap.parse_args()
    if args.profile:
        print(profile(args))
        return
    if args.family:
        args.rounds = args.rounds or (2 if args.quick else 3)
        args.steps = args.steps or (2 if args.quick else 3)
        args.modes = args.modes or ("self_cached" if args.quick else "self_cached,joint")
        args.ref_size = args.ref_size or (256 if args.quick else 512)
        print(family(args))
        return
    args.steps = args.steps or 1
    import torch

    torch.set_num_threads(args.threads)
    base, tm = build(args.double, args.single)
    pos, neg = tm.flux_conditioning(0, tokens=args.text), tm.flux_conditioning(1, tokens=args.text)
    def step(m, size, steps=1):
        tm.sample(m, pos, neg, torch.zeros(1, 16, size // 8, size // 8), steps=steps)

    step(base, 64)  # warm-up: code paths and allocator
    lines = []
    for size in args.sizes:
        base_t, base_m, rows = [], [], []
        step(base, size)  # untimed: the allocator grows to this size once, for base and patched alike
        for refs in args.refs:
            model = patched_model(base, refs, args.rank, args.attention)
            step(model, 64)
            tb, mb = measure(lambda: step(base, size, args.steps))  # noqa: B023  (called here, in this iteration)
            tp, mp = measure(lambda m=model: step(m, size, args.steps))  # noqa: B023
            tb, tp = tb / args.steps, tp / args.steps
            base_t.append(tb)
            base_m.append(mb)
            rows.append((refs, tp, mp))
            print(f"{size}px refs={refs}: base {tb:.2f} s {mb:.0f} MiB, patched {tp:.2f} s {mp:.0f} MiB",
                  file=sys.stderr, flush=True)
            del model
        bt, bm = statistics.median(base_t), statistics.median(base_m)
        tokens = args.text + (size // 16) ** 2
        lines.append(f"| {size} | 0 (base) | {tokens} | {bt:.2f} | 1.00 | {bm:.0f} | 1.00 |")
        for refs, tp, mp in rows:
            lines.append(f"| {size} | {refs} | {tokens + refs * 1024} | {tp:.2f} | {tp / bt:.2f} | {mp:.0f} | "
                         f"{mp / bm:.2f} |")
    print(f"CPU proxy: ComfyUI Flux at full width (3072, 24 heads), {args.double} double + {args.single} single "
          f"block(s), {args.text} text tokens, 512-px references (1024 tokens each) with a rank-{args.rank} "
          f"MOSAIC-layout LoRA, reference_attention={args.attention}, {args.steps} step(s) per run, fp32, "
          f"{args.threads} threads.\n")
    print("| image px | references | joint tokens | step (s) | × base | peak memory growth (MiB) | × base |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
