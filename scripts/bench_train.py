"""Training-step cost of REPA alignment (R^3-Adapter Eqs. 7-11) with cached DINO features, on versus off, in one run.

The full-size SDXL UNet architecture (ComfyUI's own classes, random weights, fp32) at 512x512 (64x64 latent) on CPU,
batch 1 with 2 subjects (left and right boxes), and the full-size R^3 adapter that ``training.sdxl.new_adapter``
builds from ``training.config.AdapterConfig`` (16 tokens, resampler 1280 wide and 4 deep on 1664-wide CLIP
features, refiner and router at the UNet's context width 2048). One step is the trainer's: ``SdxlTrainModule``'s
forward (``FrozenSdxl.predict`` with the trainable ``RegionalAttentionPatch``), ``loss.backward()``, gradient
clipping at 1.0 and an AdamW step over the adapter, the same optimiser in every configuration. The refiner runs at
alpha = 1 (phase 2 of A.1) everywhere, so the configurations differ only in the alignment:

- ``off``: the same r3 module with no projection: no capture hooks, no region means, no alignment loss;
- ``on``: REPA on the "down+mid" layers through the frozen orthogonal ``W2 W1`` (width 512), weight 0.01;
- ``cosines``: the capture and the cosines computed and logged at weight 0 (no alignment gradient), as the
  trainer does whenever its module aligns but the schedule's weight is 0 (phase 1).

The DINO features are cached tensors (DINOv3 ViT-L width 1024: the CLS of each subject's crop and the mean patch
token), as the trainer's feature cache hands them over: no DINO forward in the step. The CPU is shared, so the
configurations are interleaved per round, each step's process CPU time is reported beside its wall time, and the
time spent inside the alignment terms is measured within each step: perf_counter wrappers around the self-attention
capture hook and ``SdxlTrainModule.alignment`` (projections and cosines). That is the forward side only, without
the region means that ``TrainingAttention`` computes inline; the ``cosines`` and ``on`` rows add the rest. Peak
memory is the largest resident-set growth during the step (sampled every 5 ms), since CPU torch has no allocator
statistics.

Run: .host/venv/bin/python scripts/bench_train.py [--size 512] [--rounds 3] [--gradient-checkpointing] [--quick]
``--quick``: transformer depth 1 in every module (the 11-layer UNet, full widths) at 256 px, for a fast check.
Prints a markdown table and the settings.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the ComfyUI-in-process helpers live with the tests

import conftest  # noqa: F401  (registers the pack as comfyui_troupe; sets 1 torch thread)
import torch
from bench_common import Inside, PeakRSS, rss
from bench_sdxl import FULL_SDXL_UNET

DINO_WIDTH = 1024  # DINOv3 ViT-L/16
CLIP_TOKENS = 257  # CLIP ViT-bigG/14 penultimate states at 224 px: 16 x 16 patches + CLS
ALIGN_WEIGHT = 0.01  # R^3-Adapter A.1 / MultiPersona-Align 4.1
CONFIGS = {"off": "no capture, no loss", "on": f"REPA, weight {ALIGN_WEIGHT}",
           "cosines": "capture + cosines logged, weight 0"}
QUICK_UNET = dict(FULL_SDXL_UNET, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                  transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])


# --------------------------------------------------------------------------- models and the cached batch


def build_base(config: dict):
    """A ComfyUI SDXL ``BaseModel`` of the given UNet config, random weights (fp32), frozen."""
    from fixtures.tiny_models import ensure_comfy, init_weights

    ensure_comfy()
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(config))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    init_weights(model.diffusion_model, seed=0)
    model.requires_grad_(False)
    return model.eval()


def cached_sample(size: int, subjects: int, image_width: int):
    """One training record as the feature cache gives it (random tensors of the real shapes), boxes side by side."""
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.training.sdxl import Sample

    gen = torch.Generator().manual_seed(0)
    lat = size // 8
    boxes = [(j / subjects + 0.02, 0.1, (j + 1) / subjects - 0.02, 0.9) for j in range(subjects)]
    return Sample(latent=torch.randn(4, lat, lat, generator=gen), context=torch.randn(77, 2048, generator=gen),
                  pooled=torch.randn(1280, generator=gen), adm_size=(size, size, 0, 0),
                  layout=Layout(size, size, tuple(Region(box=b) for b in boxes)),
                  image_features=torch.randn(subjects, CLIP_TOKENS, image_width, generator=gen),
                  phrases=torch.randn(subjects, 768, generator=gen),
                  dino_cls=torch.randn(subjects, DINO_WIDTH, generator=gen),
                  dino_patch_mean=torch.randn(DINO_WIDTH, generator=gen),
                  noise=torch.randn(4, lat, lat, generator=gen), timestep=500, drop_image=False)


# --------------------------------------------------------------------------- timing inside the step


@contextlib.contextmanager
def timed_method(owner, name: str, watch: Inside):
    """Wrap ``owner.name`` (a class's method or an instance's) with ``watch`` while the block runs."""
    original = owner.__dict__.get(name) if isinstance(owner, type) else None
    setattr(owner, name, watch.wrap(getattr(owner, name)))
    try:
        yield
    finally:
        if isinstance(owner, type):
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def train_step(module, frozen, samples, optimiser, params, align_weight: float) -> dict:
    """The trainer's step: loss of the batch (alpha = 1), backward, clip at 1.0, AdamW."""
    out = module(frozen, samples, 1.0, align_weight)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------- the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (latent = size / 8); default 512, "
                    "256 with --quick")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds after one warm-up step per config")
    ap.add_argument("--tokens", type=int, default=16, help="resampler query tokens per subject")
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--configs", default="off,on,cosines", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute every transformer block and ResBlock in the backward (training.sdxl)")
    ap.add_argument("--quick", action="store_true", help="transformer depth 1 in every module, 256 px by default")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="sgd: plain SGD, no optimiser state (saves 2 x the adapter's size, about 4 GiB at full size, "
                         "so the full-size step fits in 24 GB); the same in every configuration")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: keep 1, the test harness setting)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (256 if args.quick else 512)
    if size % 64:
        ap.error(f"--size must be a multiple of 64, got {size}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(c not in CONFIGS for c in names):
        ap.error(f"--configs takes {', '.join(CONFIGS)}, got {args.configs!r}")

    from comfyui_troupe.training.config import AdapterConfig
    from comfyui_troupe.training.sdxl import (
        AlignmentCapture,
        FrozenSdxl,
        SdxlTrainModule,
        align_modules,
        attn2_widths,
        enable_gradient_checkpointing,
        new_adapter,
    )
    from comfyui_troupe.training.trainer import comfy_attention

    t0 = time.perf_counter()
    start_rss = rss()
    base = build_base(QUICK_UNET if args.quick else FULL_SDXL_UNET)
    unet_rss = rss()
    wrapped = enable_gradient_checkpointing(base.diffusion_model) if args.gradient_checkpointing else 0
    frozen = FrozenSdxl(base, "cpu", torch.float32, attention=comfy_attention())
    sizes = dataclasses.replace(AdapterConfig(), tokens=args.tokens)
    adapter = new_adapter("r3", base.diffusion_model, sizes).train()
    widths = attn2_widths(base.diffusion_model)
    modules = align_modules("down+mid")
    aligned = sorted(k for k in widths if (k[0], k[1]) in modules)
    align_widths = sorted({widths[k][1] for k in aligned})
    kw = {"dino_dim": DINO_WIDTH, "align_widths": align_widths, "align_blocks": "down+mid", "projection_width": 512}
    module_on = SdxlTrainModule(adapter, "r3", **kw)
    module_off = SdxlTrainModule(adapter, "r3", **kw)
    module_off.projection = None  # the same adapter and method, no alignment: no capture, no loss
    runs = {"off": (module_off, 0.0), "on": (module_on, ALIGN_WEIGHT), "cosines": (module_on, 0.0)}
    params = [p for p in adapter.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimiser = torch.optim.SGD(params, lr=1e-4)  # stateless: the full-size step fits 24 GB
    else:
        optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)  # the trainer's defaults, shared by all
    samples = [cached_sample(size, args.subjects, sizes.image_width)]
    unet_params = sum(p.numel() for p in base.diffusion_model.parameters())
    adapter_params = sum(p.numel() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    print(f"[bench] built {'quick (depth 1)' if args.quick else 'full-size'} SDXL UNet ({unet_params / 1e9:.2f} B "
          f"parameters, +{(unet_rss - start_rss) / 2**30:.1f} GiB) and R^3 adapter ({adapter_params / 1e6:.0f} M "
          f"trainable) in {time.perf_counter() - t0:.0f} s; {len(aligned)} aligned layers of width "
          f"{align_widths}; gradient checkpointing {'on (' + str(wrapped) + ' blocks)' if wrapped else 'off'}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    watch = Inside(clock=time.perf_counter)  # the alignment terms (wall time): capture hook, projections, cosines
    hooks = contextlib.ExitStack()
    hooks.enter_context(timed_method(AlignmentCapture, "attn1_output", watch))
    hooks.enter_context(timed_method(module_on, "alignment", watch))

    def measure(name: str) -> tuple[float, float, int, float, dict]:
        module, weight = runs[name]
        watch.reset()
        with PeakRSS() as peak:
            t, c = time.perf_counter(), time.process_time()
            out = train_step(module, frozen, samples, optimiser, params, weight)
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
        return seconds, cpu, peak.growth, watch.seconds, out

    with hooks:
        for name in names:  # warm-up: AdamW allocates its state on the first step; allocator pools settle
            s, _, mem, _, out = measure(name)
            loss = float(out["loss"].detach())
            print(f"[bench] warm-up {name}: {s:.2f} s, peak +{mem / 2**20:.0f} MiB, loss {loss:.4f}", flush=True)
        steady_rss = rss()
        times: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        mems: dict[str, list[int]] = {n: [] for n in names}
        inside: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):  # interleaved (off, on, cosines, off, ...): drift hits every config alike
            for name in names:
                s, cpu, mem, spent, out = measure(name)
                times[name].append(s)
                cpus[name].append(cpu)
                mems[name].append(mem)
                inside[name].append(spent)
                cos = f", cos cross {float(out['cos_cross']):.3f} self {float(out['cos_self']):.3f}" \
                    if "cos_cross" in out else ""
                print(f"[bench] round {r + 1} {name}: {s:.2f} s (CPU {cpu:.2f} s), peak +{mem / 2**20:.0f} MiB, "
                      f"alignment terms {spent * 1e3:.1f} ms{cos}", flush=True)

    med = {n: statistics.median(times[n]) for n in names}
    cpu_med = {n: statistics.median(cpus[n]) for n in names}
    ref, ref_cpu = med.get("off"), cpu_med.get("off")
    ref_mem = max(mems["off"]) if "off" in mems else None
    print()
    print(f"{'Quick (transformer depth 1 in every module)' if args.quick else 'Full-size'} SDXL UNet "
          f"({unet_params / 1e9:.2f} B parameters, random weights, fp32), {size}x{size} ({size // 8}x{size // 8} "
          f"latent), batch 1 with {args.subjects} subjects, CPU ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}; R^3 adapter "
          f"({adapter_params / 1e6:.0f} M trainable: {sizes.tokens} tokens, resampler {sizes.resampler_dim} x "
          f"{sizes.resampler_depth} on {sizes.image_width}-wide CLIP features, refiner {adapter.cross_dim} wide, "
          f"alpha 1); cached DINO features width {DINO_WIDTH}; REPA on down+mid ({len(aligned)} layers) through "
          f"W2 W1 (width 512); gradient checkpointing {'on' if wrapped else 'off'}; {args.optimizer}, clip 1.0; median of "
          f"{args.rounds} interleaved rounds after one warm-up step each (CPU time: the process's, all threads, "
          f"less sensitive to other jobs than wall time). Resident after the warm-up: "
          f"{steady_rss / 2**30:.1f} GiB.")
    print()
    print("| configuration | CPU s / step (median) | vs off | wall s / step (median) | vs off "
          "| alignment terms in the step (median, forward) | share of the step (wall) | peak RSS growth in the step "
          "| vs off |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def versus(value, reference, name) -> str:
        return "-" if reference is None or name == "off" else f"{(value / reference - 1) * 100:+.1f}%"

    for name in names:
        mem = max(mems[name])
        spent = statistics.median(inside[name])
        dmem = f"{(mem - ref_mem) / 2**20:+.0f} MiB" if ref_mem is not None and name != "off" else "-"
        print(f"| {name}: {CONFIGS[name]} | {cpu_med[name]:.2f} | {versus(cpu_med[name], ref_cpu, name)} | "
              f"{med[name]:.2f} | {versus(med[name], ref, name)} | {spent * 1e3:.1f} ms | "
              f"{spent / med[name] * 100:.2f}% | {mem / 2**20:.0f} MiB | {dmem} |")
    print()
    print(f"Each step's growth includes the adapter's gradients ({grad_bytes / 2**20:.0f} MiB, freed by "
          "zero_grad(set_to_none=True)); the rest is activations and temporaries.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
