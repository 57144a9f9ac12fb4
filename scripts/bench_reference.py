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
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import PeakRSS


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


def patched_model(base, refs: int, rank: int, attention: str):
    import comfy.ldm.flux.math
    import torch

    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions
    from comfyui_troupe.models.reference.lora import FluxDims, load_reference_lora, mosaic_targets
    from comfyui_troupe.nodes.reference_branch import install_branch

    dit = base.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    lats = [torch.randn(16, 64, 64, generator=g) for _ in range(refs)]  # 512-px references
    dims = FluxDims.from_model(dit)
    sd = {}
    for name, (_m, _off, rows, fin) in mosaic_targets(dims).items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=g) * 0.01
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.01
    branch = ReferenceBranch(dit=dit, latents=lats, ref_subject=list(range(refs)),
                             options=ReferenceOptions(attention=attention), lora=load_reference_lora(sd, dims))
    return install_branch(base, branch, comfy.ldm.flux.math.attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--refs", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--attention", default="joint", choices=["joint", "self_cached"])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1, help="sampler steps per measured run (time is per step)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    args = ap.parse_args()
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
