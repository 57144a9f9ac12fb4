"""Training-step cost of the FLUX methods (dynaip, mosaic, aligngen, focusdpo-flux), gradient checkpointing on and off.

The base is a reduced-depth, full-width CPU proxy of FLUX.1-dev, built as ``scripts/bench_flux.py`` builds it:
ComfyUI's own ``Flux`` class at hidden 3072, 24 heads, MLP ratio 4, T5 context 4096, but ``--double`` double and
``--single`` single blocks (FLUX.1 has 19 + 38), random weights. Its weights are STORED in bf16 and computed in
fp32 through ComfyUI's manual-cast ops (``set_inference_dtype(bf16, fp32)``), the way ComfyUI runs a bf16 file on
a device without bf16 arithmetic: this CPU (AMD EPYC, no avx512_bf16) ran a 2048 x 3072 x 3072 bf16 matmul at
0.23 GFLOP/s against 106 GFLOP/s in fp32 (2 threads), so bf16 compute would time the missing bf16 units, not the
methods. The base is frozen (``requires_grad_(False)``, eval); the trainer's ``FrozenFlux`` runs it with compute
dtype fp32, ComfyUI's attention and ``gradient_checkpointing`` on or off, inside ``comfy_training_mode()``, with no
autocast (``train.precision = "fp32"``).

Per method, what trains and one batch are built as the trainer builds them, from cached tensors of the real shapes
(the feature caches hand the step latents and encodings; no VAE, CLIP or DINO runs in it), ``--subjects`` subjects
in side-by-side boxes, ``--size`` px (latent size / 8), T5 context ``--text-tokens`` x 4096 (ComfyUI's FLUX T5
tokenizer pads a caption to 256 tokens, what the cache holds for captions shorter than that), CLIP-L pooled 768:

- ``dynaip`` (``training.flux``): a new troupe-flux adapter and HMoE fusion (``new_modules``, AdapterConfig's
  sizes) in ``FluxTrainModule``; one ``FluxSample`` with levels [N, 3, 577, 1024] (CLIP ViT-L/14-336 layers
  10/17/24), no expert or CFG dropout;
- ``mosaic`` (``training.reference``): ``TrainableReferenceLoRA`` at MethodConfig's rank in ``ReferenceTrainModule``
  with MethodConfig's loss weights, attention layers and rows; one ``ReferenceSample`` with one reference latent per
  subject at the run's resolution (the trainer's reference size) and a 4 x 4 grid of correspondences per subject
  (as the test data);
- ``aligngen`` (``training.aligngen``): the same LoRA plus S* and the DEM (``new_dem``, MethodConfig's heads and
  MLP ratio) in ``AlignGenTrainModule``; T5 runs in the step (S* lives in its input), here a reduced-depth T5 at
  T5-XXL width (``--t5-layers``, default 1 of 24: d_model 4096, d_ff 10240, 64 heads, ComfyUI's ``T5XXLModel`` and
  tokenizer, random weights stored in bf16, fp32 compute); Redux tokens cached [S, 729, 4096]; no reference or
  concept dropout drawn;
- ``focusdpo-flux`` (``training.focusdpo``): ``FluxDpoModule`` over a DynaIP adapter + fusion and its frozen
  reference copy; one pair (winner and loser: the DiT runs batch 2 with gradients and batch 2 without for the
  reference), cached focus maps on the latent patch grid.

One step is the trainer's: ``out = module(frozen, samples, 0.0, 0.0)``, ``out["loss"].backward()``, gradient norm
clipped at 1.0, an AdamW step (lr 1e-4, weight decay 0.01, TrainConfig's defaults, the same for every method:
AlignGen's paper uses Prodigy, AdamW keeps the table comparable), ``zero_grad(set_to_none=True)``. Methods run one
after another (each built, measured and freed before the next, so the process stays within a few GB); within a
method one warm-up step per setting (AdamW allocates its state, allocator pools settle), then ``--rounds`` rounds
alternating the settings, so a slower period of the shared machine hits both alike. Reported: the median process
CPU time and wall time per step, the largest resident-set growth during a step (sampled every 5 ms after
``malloc_trim``: CPU torch has no allocator statistics), the resident size after the warm-up, and how many
checkpointed regions the forward made (``torch.utils.checkpoint.checkpoint`` calls: 0 means the setting had no
effect for that method).

Run: .host/venv/bin/python scripts/bench_train_flux.py [--methods dynaip,mosaic,aligngen,focusdpo-flux]
     [--gc on,off] [--rounds 2] [--size 512] [--double 1 --single 1] [--subjects 2] [--threads 0] [--quick]
``--quick``: the same depth at width 256 (2 heads of 128, T5 and Redux width 256): a check that it runs.
``--optimizer sgd``: no optimiser state, for a machine where aligngen's full-width DEM (268 M parameters, 3 GiB of
AdamW state and weights) does not fit beside its step. Prints a markdown table and the settings.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the ComfyUI-in-process helpers live with the tests

import conftest  # noqa: F401  (registers the pack as comfyui_troupe; sets 1 torch thread)
import torch
from bench_common import Inside, PeakRSS, rss, trim
from bench_flux import FULL_FLUX

METHODS = ("dynaip", "mosaic", "aligngen", "focusdpo-flux")
SETTINGS = {"on": True, "off": False}  # --gc value -> FrozenFlux(gradient_checkpointing=...)
CLIP_WIDTH, CLIP_TOKENS, CLIP_LEVELS = 1024, 577, 3  # CLIP ViT-L/14-336, layers 10/17/24 (DynaIP)
REDUX_TOKENS = 729  # FLUX Redux: SigLIP so400m at 384 px, 27 x 27 patches
POOLED = 768  # CLIP-L pooled (FLUX vec_in_dim)
LABELS = ("dog", "teapot", "clock", "backpack", "lantern", "flower")
POINTS = (0.125, 0.375, 0.625, 0.875)  # a 4 x 4 grid of correspondences per subject (tests/fixtures/training_mosaic)
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01  # TrainConfig's defaults, the same optimiser for every method
QUICK_WIDTH = 256
QUICK_FLUX = dict(FULL_FLUX, hidden_size=QUICK_WIDTH, num_heads=2, context_in_dim=QUICK_WIDTH)  # heads of 128
QUICK_T5 = {"d_model": QUICK_WIDTH, "d_ff": 640, "d_kv": 64, "num_heads": 4}  # T5-XXL: 4096, 10240, 64, 64


# --------------------------------------------------------------------------- the frozen models


def build_base(config: dict, double: int, single: int):
    """A ComfyUI FLUX ``BaseModel`` of ``config`` at the given depth: weights stored in bf16, computed in fp32
    (manual cast), random (``init_weights``), frozen."""
    from fixtures.tiny_models import ensure_comfy, init_weights

    ensure_comfy()
    import comfy.supported_models

    cfg = comfy.supported_models.Flux(dict(config, depth=double, depth_single_blocks=single))
    cfg.set_inference_dtype(torch.bfloat16, torch.float32)
    model = cfg.get_model({})
    init_weights(model.diffusion_model, seed=0)
    model.requires_grad_(False)
    return model.eval()


def build_clip(t5_config: dict):
    """``comfy.sd.CLIP`` around ComfyUI's FluxClipModel and FluxTokenizer: T5 from ``t5_config`` (over T5-XXL's
    own config), stored in bf16 (manual cast to fp32 in use); CLIP-L 3 x 768 (never run in the step). Random
    weights as the test clips (norms 1, the rest normal(0, 0.02))."""
    import typing

    import comfy.sd
    import comfy.text_encoders.flux
    from custom_nodes.troupe_test_nodes.clip_nodes import tiny_text_config
    from fixtures.tiny_models import init_weights

    class Target:
        params: typing.ClassVar[dict] = {}
        clip = comfy.text_encoders.flux.flux_clip()
        tokenizer = comfy.text_encoders.flux.FluxTokenizer

    options = {"clip_l_model_config": tiny_text_config(POOLED), "t5xxl_model_config": t5_config,
               "dtype": torch.bfloat16}
    clip = comfy.sd.CLIP(Target(), model_options=options)
    init_weights(clip.cond_stage_model, seed=3)
    clip.cond_stage_model.requires_grad_(False)
    return clip


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def matmul_rates(m: int = 256, n: int = 512) -> dict[torch.dtype, float]:
    """GFLOP/s of an [m, n] x [n, n] matmul in fp32 and bf16 on this CPU (the best of 3 after a warm-up): whether
    computing the bf16 weights in bf16 would be an option here. Small, so a CPU without bf16 units (0.23 GFLOP/s on
    the machine of docs/measurements.md) still answers in a few seconds."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[dtype] = 2 * m * n * n / best / 1e9
    return out


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def nparams(params) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------- the cached batch


@dataclasses.dataclass
class Shapes:
    """What every method's batch shares: image side, subjects, text tokens and width."""

    size: int
    subjects: int
    text_tokens: int
    text_width: int

    @property
    def latent(self) -> int:
        return self.size // 8

    def boxes(self) -> list[tuple[float, float, float, float]]:
        n = self.subjects
        return [(j / n + 0.02, 0.1, (j + 1) / n - 0.02, 0.9) for j in range(n)]

    def layout(self):
        from comfyui_troupe.models.layout.layout import Layout, Region

        return Layout(self.size, self.size, tuple(Region(box=b) for b in self.boxes()))

    def cached(self, gen: torch.Generator) -> dict:
        """The FLUX record the feature cache gives: latent, T5 context, CLIP-L pooled, and this step's noise."""
        lat = self.latent
        return {"latent": torch.randn(16, lat, lat, generator=gen),
                "context": torch.randn(self.text_tokens, self.text_width, generator=gen),
                "pooled": torch.randn(POOLED, generator=gen), "noise": torch.randn(16, lat, lat, generator=gen)}


def flux_sample(shapes: Shapes, sigma: float, gen: torch.Generator):
    from comfyui_troupe.training.flux import FluxSample

    n = shapes.subjects
    return FluxSample(**shapes.cached(gen), layout=shapes.layout(),
                      levels=torch.randn(n, CLIP_LEVELS, CLIP_TOKENS, CLIP_WIDTH, generator=gen), sigma=sigma,
                      drop_image=False, expert_drop=torch.zeros(n, CLIP_LEVELS, dtype=torch.bool))


def correspondences(shapes: Shapes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per subject (target tokens, reference tokens) of a 4 x 4 grid of points: reference point (u, v) lies at
    (x0 + u (x1 - x0), y0 + v (y1 - y0)) of the target (a reference pasted into its box), mapped as the trainer maps
    manifest points (``target_token``, ``reference_token``)."""
    from comfyui_troupe.models.layout.grid import token_grid
    from comfyui_troupe.training.reference import reference_token, target_token

    grid = token_grid(shapes.latent, shapes.latent, 2)
    side = (shapes.size, shapes.size)
    out = []
    for x0, y0, x1, y1 in shapes.boxes():
        tgt, ref = [], []
        for u in POINTS:
            for v in POINTS:
                t = target_token((x0 + u * (x1 - x0), y0 + v * (y1 - y0)), side, shapes.size, grid)
                if t is not None:
                    tgt.append(t)
                    ref.append(reference_token((u, v), side, grid))
        out.append((torch.tensor(tgt, dtype=torch.long), torch.tensor(ref, dtype=torch.long)))
    return out


def reference_sample(shapes: Shapes, sigma: float, gen: torch.Generator):
    from comfyui_troupe.training.reference import ReferenceSample

    cached = shapes.cached(gen)
    lat = shapes.latent  # the trainer's reference size is the run's resolution
    return ReferenceSample(**cached, references=torch.randn(shapes.subjects, 16, lat, lat, generator=gen),
                           points=correspondences(shapes), sigma=sigma, drop_image=False,
                           labels=LABELS[:shapes.subjects], record=0)


# --------------------------------------------------------------------------- what trains, per method


@dataclasses.dataclass
class Method:
    """One method ready to step: the module the optimiser trains, one batch, and what it holds besides."""

    module: torch.nn.Module
    samples: list
    frozen_extra: str = ""  # frozen models of the method's own (T5, the reference copy), for the notes
    keep: tuple = ()  # objects the step needs alive (the T5 clip, its slot folder)


def dynaip_modules(dit):
    from comfyui_troupe.training.config import AdapterConfig
    from comfyui_troupe.training.flux import FluxTrainModule, new_modules

    adapter, fusion = new_modules(dit, CLIP_WIDTH, AdapterConfig(), seed=0)
    return FluxTrainModule(adapter, fusion)


def setup_dynaip(base, shapes: Shapes, sigma: float, args) -> Method:
    gen = torch.Generator().manual_seed(0)
    return Method(dynaip_modules(base.diffusion_model).train(), [flux_sample(shapes, sigma, gen)])


def setup_focusdpo(base, shapes: Shapes, sigma: float, args) -> Method:
    from comfyui_troupe.models.layout.grid import token_grid
    from comfyui_troupe.training.config import MethodConfig
    from comfyui_troupe.training.focusdpo import FluxDpoModule, PairSample, dpo_module

    m = MethodConfig(name="focusdpo-flux")
    module = dpo_module(FluxDpoModule, dynaip_modules(base.diffusion_model), m).train()
    gen = torch.Generator().manual_seed(0)
    winner = flux_sample(shapes, sigma, gen)
    grid = token_grid(shapes.latent, shapes.latent, m.focus_patch)
    focus = 0.5 + torch.rand(2, *grid, generator=gen)
    pair = PairSample(sample=winner, loser=torch.randn(winner.latent.shape, generator=gen),
                      focus=focus / focus.flatten(1).mean(1)[:, None, None])
    return Method(module, [pair], frozen_extra=f"reference copy {nparams(module.reference.parameters()) / 1e6:.0f} M "
                  "(fp32, no gradient)")


def reference_lora(dit, m):
    from comfyui_troupe.models.reference.lora import FluxDims
    from comfyui_troupe.training.reference import TrainableReferenceLoRA

    return TrainableReferenceLoRA(FluxDims.from_model(dit), m.lora_rank, seed=0)


def setup_mosaic(base, shapes: Shapes, sigma: float, args) -> Method:
    from comfyui_troupe.models.reference.branch import SAME_INDEX, ReferenceOptions
    from comfyui_troupe.training.config import MethodConfig
    from comfyui_troupe.training.reference import LossSettings, ReferenceTrainModule

    m = MethodConfig(name="mosaic")
    losses = LossSettings(m.correspondence_weight, m.disentangle_weight, m.attention_layers, m.attention_rows)
    module = ReferenceTrainModule(reference_lora(base.diffusion_model, m), ReferenceOptions(positions=SAME_INDEX),
                                  losses).train()
    return Method(module, [reference_sample(shapes, sigma, torch.Generator().manual_seed(0))])


def setup_aligngen(base, shapes: Shapes, sigma: float, args) -> Method:
    from comfyui_troupe.models.reference.branch import SAME_INDEX, ReferenceOptions
    from comfyui_troupe.training.aligngen import (
        AlignGenSample,
        AlignGenTrainModule,
        SlotTokenizer,
        SStar,
        T5Encoder,
        new_dem,
        s_star_start,
    )
    from comfyui_troupe.training.config import MethodConfig

    m = MethodConfig(name="aligngen")
    t5 = dict(QUICK_T5 if args.quick else {}, num_layers=args.t5_layers)
    clip = build_clip(t5)
    encoder = T5Encoder(clip)
    start = s_star_start(clip.tokenizer.t5xxl, encoder.table(), m.s_star_init)
    dem = new_dem(encoder.width, encoder.width, m.dem_heads, m.dem_mlp_ratio, seed=0)
    options = ReferenceOptions(positions=SAME_INDEX, selective_text=True)  # Eq. 6; t_ref = 0
    module = AlignGenTrainModule(reference_lora(base.diffusion_model, m), SStar(start), dem, encoder, options).train()
    folder = tempfile.TemporaryDirectory(prefix="bench-aligngen-")
    slots = SlotTokenizer(clip, Path(folder.name), encoder.width)
    words = LABELS[:shapes.subjects]
    caption = "a photo of " + " and ".join(f"a {w}" for w in words) + " on a wooden table"
    tokens, stars, concept, prompt = slots.encode(caption, words)
    gen = torch.Generator().manual_seed(0)
    ref = reference_sample(shapes, sigma, gen)
    fields = {f.name: getattr(ref, f.name) for f in dataclasses.fields(ref)}
    sample = AlignGenSample(**fields, t5_tokens=tokens, stars=stars, concept=concept,
                            redux=torch.randn(shapes.subjects, REDUX_TOKENS, encoder.width, generator=gen),
                            dropped=(False,) * shapes.subjects, words=words, prompt=prompt)
    t5_model = clip.cond_stage_model.t5xxl
    layers = len(t5_model.transformer.encoder.block)
    extra = (f"T5 {layers} layer(s) at width {encoder.width} ({nparams(t5_model.parameters()) / 1e6:.0f} M, "
             f"{nbytes(t5_model) / 2**20:.0f} MiB bf16), {len(tokens)} tokens")
    return Method(module, [sample], frozen_extra=extra, keep=(clip, folder))


SETUPS = {"dynaip": setup_dynaip, "mosaic": setup_mosaic, "aligngen": setup_aligngen,
          "focusdpo-flux": setup_focusdpo}


# --------------------------------------------------------------------------- the step


@contextlib.contextmanager
def counting_checkpoints(watch: Inside):
    """Count ``torch.utils.checkpoint.checkpoint`` calls while the block runs (the trainer's modules import it
    where they use it, so the wrapped function is the one they call)."""
    import torch.utils.checkpoint as ckpt

    original = ckpt.checkpoint
    ckpt.checkpoint = watch.wrap(original)
    try:
        yield
    finally:
        ckpt.checkpoint = original


def train_step(module, frozen, samples, optimiser, params) -> dict:
    """The trainer's step: the batch's loss, backward, clip at 1.0, AdamW, gradients freed."""
    out = module(frozen, samples, 0.0, 0.0)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return out


@dataclasses.dataclass
class Result:
    """One (method, setting): per-step measurements of the rounds, and the method's sizes."""

    method: str
    setting: str
    cpu: list[float] = dataclasses.field(default_factory=list)
    wall: list[float] = dataclasses.field(default_factory=list)
    peak: list[int] = dataclasses.field(default_factory=list)
    regions: int = 0
    steady_rss: int = 0
    trainable: int = 0
    trainable_bytes: int = 0
    warmup_s: float = 0.0
    loss: float = float("nan")
    frozen_extra: str = ""


def run_method(name: str, base, shapes: Shapes, sigma: float, settings: list[str], args, log) -> list[Result]:
    """Build ``name``, one warm-up step per setting, then ``args.rounds`` rounds alternating the settings."""
    from comfyui_troupe.training.flux import FrozenFlux
    from comfyui_troupe.training.trainer import comfy_attention

    t0 = time.perf_counter()
    method = SETUPS[name](base, shapes, sigma, args)
    params = [p for p in method.module.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimiser = torch.optim.SGD(params, lr=LEARNING_RATE)  # stateless: 2 x the trainable size less memory
    else:
        optimiser = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    frozen = {s: FrozenFlux(base, "cpu", dtype=torch.float32, attention=comfy_attention(),
                            gradient_checkpointing=SETTINGS[s]) for s in settings}
    results = {s: Result(name, s, trainable=nparams(params), trainable_bytes=nbytes(method.module),
                         frozen_extra=method.frozen_extra) for s in settings}
    extra = f"; frozen besides the base: {method.frozen_extra}" if method.frozen_extra else ""
    log(f"[bench] {name}: built in {time.perf_counter() - t0:.0f} s, {nparams(params) / 1e6:.2f} M trainable{extra}")
    watch = Inside(clock=time.perf_counter)

    def measure(setting: str) -> tuple[float, float, int, int, float]:
        watch.reset()
        with PeakRSS() as peak, counting_checkpoints(watch):
            t, c = time.perf_counter(), time.process_time()
            out = train_step(method.module, frozen[setting], method.samples, optimiser, params)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        return cpu, wall, peak.growth, watch.calls, float(out["loss"].detach())

    for s in settings:  # warm-up: AdamW allocates its state on the first step; allocator pools settle
        cpu, wall, mem, regions, loss = measure(s)
        results[s].warmup_s, results[s].regions, results[s].loss = wall, regions, loss
        log(f"[bench] {name} GC {s} warm-up: {wall:.2f} s (CPU {cpu:.2f} s), peak +{mem / 2**20:.0f} MiB, "
            f"{regions} checkpointed regions, loss {loss:.4f}")
    steady = rss()
    log(f"[bench] {name}: resident after the warm-up {steady / 2**30:.2f} GiB")
    for r in range(args.rounds):  # alternating (on, off, on, ...): drift hits both settings alike
        for s in settings:
            cpu, wall, mem, regions, loss = measure(s)
            res = results[s]
            res.cpu.append(cpu)
            res.wall.append(wall)
            res.peak.append(mem)
            res.steady_rss = steady
            log(f"[bench] {name} GC {s} round {r + 1}: {wall:.2f} s (CPU {cpu:.2f} s), peak +{mem / 2**20:.0f} MiB, "
                f"{regions} checkpointed regions, loss {loss:.4f}")
    return [results[s] for s in settings]  # the method, its optimiser and batch are freed with this frame


# --------------------------------------------------------------------------- the table


def table(results: list[Result]) -> list[str]:
    lines = [("| method | gradient checkpointing | CPU s / step (median) | wall s / step (median) "
              "| peak RSS growth in the step | GC on / off: CPU, wall, memory | resident after warm-up "
              "| checkpointed regions / step | trainable parameters |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by = {(r.method, r.setting): r for r in results}
    for r in results:
        cpu, wall, mem = statistics.median(r.cpu), statistics.median(r.wall), max(r.peak)
        ratio = "-"
        on, off = by.get((r.method, "on")), by.get((r.method, "off"))
        if r.setting == "on" and off is not None:
            ratio = (f"{cpu / statistics.median(off.cpu):.2f}, {wall / statistics.median(off.wall):.2f}, "
                     f"{mem / max(1, max(off.peak)):.2f}")
        elif r.setting == "off" and on is None:
            ratio = "GC on not run"
        lines.append(f"| {r.method} | {r.setting} | {cpu:.2f} | {wall:.2f} | {mem / 2**20:.0f} MiB | {ratio} | "
                     f"{r.steady_rss / 2**30:.2f} GiB | {r.regions} | {r.trainable / 1e6:.2f} M |")
    return lines


# --------------------------------------------------------------------------- the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--gc", default="on,off", help="gradient checkpointing settings, comma-separated: on, off")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds after one warm-up step per setting")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--double", type=int, default=1, help="double blocks of the proxy (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=1, help="single blocks of the proxy (FLUX.1: 38)")
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=256,
                    help="T5 tokens of the cached context (ComfyUI's FLUX T5 tokenizer pads to 256)")
    ap.add_argument("--t5-layers", type=int, default=1, help="aligngen: T5 layers run in the step (T5-XXL: 24)")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="sgd: plain SGD, no optimiser state (saves 2 x the trainable size: about 2 GiB for aligngen's "
                         "DEM at T5 width), the same for every method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: keep 1, the test harness setting)")
    ap.add_argument("--quick", action="store_true", help=f"width {QUICK_WIDTH} (DiT, T5, Redux): a check that it runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names or any(m not in METHODS for m in names):
        ap.error(f"--methods takes {', '.join(METHODS)}, got {args.methods!r}")
    settings = [s.strip() for s in args.gc.split(",") if s.strip()]
    if not settings or any(s not in SETTINGS for s in settings) or len(set(settings)) != len(settings):
        ap.error(f"--gc takes on, off or both, got {args.gc!r}")
    if args.size % 16:
        ap.error(f"--size must be a multiple of 16 (FLUX patches 2 x 2 latent pixels), got {args.size}")
    if not 1 <= args.subjects <= len(LABELS):
        ap.error(f"--subjects must be 1 to {len(LABELS)}, got {args.subjects}")
    if args.rounds < 1 or args.double < 1 or args.single < 0 or args.t5_layers < 1:
        ap.error("--rounds, --double and --t5-layers must be at least 1, --single at least 0")

    from comfyui_troupe.training.trainer import comfy_training_mode

    config = QUICK_FLUX if args.quick else FULL_FLUX
    t0 = time.perf_counter()
    start_rss = rss()
    base = build_base(config, args.double, args.single)
    base_rss = rss()
    dit = base.diffusion_model
    base_params, base_bytes = nparams(dit.parameters()), nbytes(dit)
    sigmas = base.model_sampling.sigmas.detach().float()
    sigma = float(sigmas[len(sigmas) // 2])  # the cost does not depend on it: the median of the shifted table
    shapes = Shapes(args.size, args.subjects, args.text_tokens, int(config["context_in_dim"]))
    width = config["hidden_size"]
    print(f"[bench] built the {'quick' if args.quick else 'full-width'} FLUX proxy ({args.double} double + "
          f"{args.single} single blocks, width {width}, {base_params / 1e6:.0f} M parameters, "
          f"{base_bytes / 2**20:.0f} MiB in bf16, +{(base_rss - start_rss) / 2**30:.2f} GiB resident) in "
          f"{time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}", flush=True)

    results: list[Result] = []
    with comfy_training_mode():
        for name in names:
            results += run_method(name, base, shapes, sigma, settings, args, lambda s: print(s, flush=True))
            gc.collect()  # the next method starts from the base alone
            trim()

    tokens = (args.size // 16) ** 2
    rates = matmul_rates()
    optimiser_name = (f"SGD lr {LEARNING_RATE:g} (no optimiser state)" if args.optimizer == "sgd" else
                      f"AdamW lr {LEARNING_RATE:g} weight decay {WEIGHT_DECAY:g}")
    print()
    print(f"{'Quick (width ' + str(width) + ')' if args.quick else 'Reduced-depth, full-width'} FLUX.1-dev proxy: "
          f"ComfyUI's Flux class, {args.double} double + {args.single} single blocks (FLUX.1: 19 + 38), hidden "
          f"{width}, {config['num_heads']} heads, T5 context width {config['context_in_dim']}, "
          f"{base_params / 1e6:.0f} M parameters, random weights stored in bf16 ({base_bytes / 2**20:.0f} MiB; "
          f"full FLUX.1-dev: 11.9 B parameters, about 22.2 GiB), computed in fp32 through ComfyUI's manual-cast ops "
          f"(on this CPU a 256 x 512 x 512 matmul runs at {rates[torch.bfloat16]:.2f} GFLOP/s in bf16 against "
          f"{rates[torch.float32]:.1f} in fp32), frozen. {args.size}x{args.size} ({tokens} image tokens), T5 context {args.text_tokens} tokens, "
          f"batch 1 (one record; focusdpo-flux: one pair, winner and loser) with {args.subjects} subjects in "
          f"side-by-side boxes, features cached (no encoder in the step except aligngen's T5). CPU "
          f"({cpu_name()}, {os.cpu_count()} cores shared with other jobs, "
          f"{torch.get_num_threads()} torch threads), torch {torch.__version__}; the trainer's step "
          f"(module forward, backward, clip 1.0, {optimiser_name} for every method, zero_grad) in comfy_training_mode, no autocast; methods one after another, within a method one "
          f"warm-up step per setting then the median of {args.rounds} alternating rounds (CPU time: the process's, "
          f"all threads, less disturbed by other jobs than wall time).")
    print()
    print("\n".join(table(results)))
    print()
    print("Peak RSS growth is the largest resident-set growth during a step over the resident size at its start "
          "(after malloc_trim); it includes the gradients of what trains (freed by zero_grad(set_to_none=True)), the "
          "activations kept for the backward pass and, with the weights stored in bf16, the fp32 copies of the "
          "frozen weights that the manual-cast layers keep for it (recomputed instead under checkpointing). "
          "*Checkpointed regions*: torch.utils.checkpoint calls in a step's forward; 0 with GC on means the method "
          "ignored the setting. Scale by depth: FLUX.1 has 19 double and 38 single blocks, each costing about what "
          "one block costs here (per-block work and memory grow with the block count; the embedders and the final "
          "layer do not).")
    notes = {r.method: r for r in reversed(results)}  # each method's first setting: its first warm-up step
    state = "AdamW state twice that" if args.optimizer == "adamw" else "no optimiser state"
    for name in names:
        r = notes[name]
        extra = f"; frozen besides the base: {r.frozen_extra}" if r.frozen_extra else ""
        print(f"- {name}: {r.trainable / 1e6:.2f} M trainable parameters ({r.trainable_bytes / 2**20:.0f} MiB fp32, "
              f"{state}){extra}; loss at the first warm-up step {r.loss:.4f}.")
    if "aligngen" in names:
        print(f"- aligngen runs T5 in the step (S* is a T5 input embedding): here {args.t5_layers} of T5-XXL's 24 "
              f"layers at width {shapes.text_width} (T5-XXL: 24 layers of width 4096), weights stored in bf16; its DEM "
              "at that width is most of what trains.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
