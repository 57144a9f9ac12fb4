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
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model helpers (ComfyUI in-process on CPU) live with the tests

import conftest  # noqa: F401  (registers the pack as comfyui_troupe; sets 1 torch thread)
import torch
from bench_common import PeakRSS

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
    args = ap.parse_args()
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
