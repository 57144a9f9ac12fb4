"""The training loop on HF ``accelerate``: one code path for 1 CPU, 1 GPU, N GPUs or N nodes.

The engine handles devices, DDP, mixed precision and gradient accumulation; this loop adds what makes a run
reproducible and resumable:

- **data order**: a seeded permutation per epoch over the manifest; the global batch of step s is the same whatever
  the number of processes (process r takes its ``batch_size`` slice of it), so 2 processes with batch 2 see the
  same records as 1 process with batch 4;
- **per-sample draws** (noise, timestep, which reference, CFG dropout) come from a generator seeded by the run's
  seed and the sample's position in the data stream, never from a process's RNG;
- **checkpoints** (``accelerator.save_state``) hold the trained modules, optimiser, scheduler and RNG states, plus
  ``trainer_state.json`` with the step (the data position) and the adapter file at that step; ``resume`` continues
  the same data order.

What a user watches: a progress bar (loss, step time, ETA), ``log.csv`` and ``curves.png`` rewritten at every
checkpoint, sample grids (``samples/step-XXXXXX.png``) every ``sample_every`` steps, optional TensorBoard.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.sdxl.adapter import SdxlAdapter
from .config import Config
from .manifest import read_manifest
from .sdxl import Sample, SdxlMethod, SdxlTrainModule, phase_schedule

LOG = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
LOG_FIELDS = ("step", "loss", "diffusion", "align", "cos_cross", "cos_self", "alpha", "align_weight", "lr",
              "step_seconds", "eval_diffusion", "margin", "accuracy", "correspondence", "disentangle")
EVAL_SAMPLES = 8  # the fixed evaluation batch: the same records, noise and timesteps at every checkpoint
EVAL_STREAM = 1 << 40  # its positions lie far beyond any training position, so its draws are its own


class TrainingInterrupted(Exception):
    """Raised after an interruption left a resumable checkpoint (``checkpoint`` is its folder)."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"training interrupted; resume from {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class Components:
    """The frozen models a run trains against (ComfyUI objects) and the adapter it starts from.

    ``base_model`` is a ComfyUI ``BaseModel`` (``ModelPatcher.model``). Unless ``owned``, the trainer works on a
    deep copy, so the user's graph never sees gradient checkpointing, a dtype change or a device move.
    """

    base_model: object
    clip: object
    vae: object
    clip_vision: object
    dino: object | None = None
    initial_adapter: SdxlAdapter | None = None  # a FluxImageAdapter for a FLUX method
    owned: bool = False
    initial_fusion: object | None = None  # FLUX methods: an HMoE to continue (None = a new one)


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    log: list[dict] = field(default_factory=list)
    curves: Path | None = None
    last_samples: Path | None = None
    checkpoint: Path | None = None


# --------------------------------------------------------------------------- reproducible data stream


def sample_seed(seed: int, position: int) -> int:
    """The seed of the draws of the sample at ``position`` of the data stream."""
    digest = hashlib.sha256(f"troupe-train/{seed}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def record_index(seed: int, position: int, n: int) -> int:
    """Which record sits at ``position``: a seeded permutation of the manifest per epoch."""
    epoch, offset = divmod(position, n)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=gen)[offset])


def positions(step: int, micro: int, grad_accum: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The data-stream positions this process trains on at (optimiser step, micro-batch)."""
    start = (step * grad_accum + micro) * batch_size * world + rank * batch_size
    return list(range(start, start + batch_size))


def lr_lambda(schedule: str, warmup: int, total: int, delay: int = 0) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warm-up, then constant, cosine or linear decay; 0 before
    ``delay`` (R^3-Adapter A.1: the refiner stays frozen during phase 1)."""

    def f(step: int) -> float:
        if step < delay:
            return 0.0
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


# --------------------------------------------------------------------------- the run


class Trainer:
    """One training run (``train`` below is the entry point)."""

    def __init__(self, config: Config, components: Components, *, progress: Callable[[int, int, dict], None] | None = None,
                 interrupted: Callable[[], bool] | None = None, show_bar: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.config = config
        self.progress = progress
        self.interrupted = interrupted
        self.show_bar = show_bar
        reset_engine_state()
        t = config.train
        if t.tensorboard:
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                from .config import ConfigError

                raise ConfigError("train.tensorboard: TensorBoard logging needs the tensorboard package; install it "
                                  "in ComfyUI's Python (pip install tensorboard) or set tensorboard = false")
        self.out = Path(t.output_dir)
        cpu = not torch.cuda.is_available()
        mixed = autocast_precision(t.precision, cpu)
        if mixed != {"fp32": "no"}.get(t.precision, t.precision):
            LOG.warning("train.precision %s: mixed precision is a GPU feature here; this CPU run computes in fp32 "
                        "(as ComfyUI does on a CPU)", t.precision)
        self.acc = Accelerator(
            mixed_precision=mixed, gradient_accumulation_steps=t.grad_accum, cpu=cpu,
            step_scheduler_with_optimizer=False, log_with="tensorboard" if t.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "tensorboard")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.main = self.acc.is_main_process
        self.records = read_manifest(config.data.manifest)
        self.method = method_for(config.method.name)
        self._setup_models(components)
        self._setup_data(components)
        self._setup_optimiser()
        self.step = 0
        self.log: list[dict] = []
        self.last_samples: Path | None = None

    # ---------------------------------------------------------------- set-up

    def _setup_models(self, c: Components) -> None:
        self.method.setup_models(self, c)

    def _setup_data(self, c: Components) -> None:
        self.method.setup_data(self, c)

    def _setup_optimiser(self) -> None:
        cfg = self.config
        t = cfg.train
        refiner = [p for n, p in self.module.named_parameters() if n.startswith("adapter.refiner.")]
        ids = {id(p) for p in refiner}
        rest = [p for p in self.module.parameters() if id(p) not in ids and p.requires_grad]
        groups = [{"params": rest}]
        lambdas = [lr_lambda(t.lr_schedule, t.warmup_steps, t.steps)]
        if refiner:
            groups.append({"params": refiner})
            delay = cfg.method.phase1_steps if cfg.method.name == "r3" else 0
            lambdas.append(lr_lambda(t.lr_schedule, t.warmup_steps, t.steps, delay=delay))
        if getattr(t, "optimizer", "adamw") == "prodigy":  # AlignGen "Implementation details": Prodigy with
            from .config import prodigy_class  # safeguard warmup and bias correction (optional prodigyopt package)

            optimiser = prodigy_class()(groups, lr=t.learning_rate, weight_decay=t.weight_decay,
                                        safeguard_warmup=True, use_bias_correction=True)
        else:
            optimiser = torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambdas)
        self.module, self.optimiser, self.scheduler = self.acc.prepare(self.module, optimiser, scheduler)

    # ---------------------------------------------------------------- the data stream

    def sample_at(self, position: int) -> Sample:
        """The record and the draws at ``position`` of the data stream (the method's own sample type)."""
        return self.method.sample_at(self, position)

    def evaluate(self) -> float:
        """The diffusion loss of a fixed batch (records, noise, timesteps and dropout all fixed; no image or text
        dropped): a curve without the step-to-step sampling noise of the training loss."""
        samples = [self.sample_at(EVAL_STREAM + i) for i in range(EVAL_SAMPLES)]
        for s in samples:
            s.drop_image = False
        module = self.unwrapped()
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                alpha, _ = phase_schedule(max(self.step - 1, 0), self.config.method.name,
                                          self.config.method.phase1_steps, self.config.method.ramp_steps, 0.0)
                out = module(self.frozen, samples, alpha, 0.0)
                value = float(out["eval"] if "eval" in out else out["diffusion"])
        finally:
            module.train(was)
        return value

    def batch(self, step: int, micro: int) -> list[Sample]:
        t = self.config.train
        pos = positions(step, micro, t.grad_accum, t.batch_size, self.acc.process_index, self.acc.num_processes)
        return [self.sample_at(p) for p in pos]

    # ---------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        with comfy_training_mode():
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.config
        t = cfg.train
        self._maybe_resume()
        if t.tensorboard:
            self.acc.init_trackers("troupe", config=flat_config(cfg))
        if self.step == 0:
            self.log.append({"step": 0, "eval_diffusion": self.evaluate()})
        bar = self._bar(t.steps, "training", initial=self.step)
        last_checkpoint = None
        try:
            while self.step < t.steps:
                began = time.perf_counter()
                alpha, lam = phase_schedule(self.step, cfg.method.name, cfg.method.phase1_steps, cfg.method.ramp_steps,
                                            cfg.method.align_weight)
                sums: dict[str, float] = {}
                for micro in range(t.grad_accum):
                    with self.acc.accumulate(self.module):
                        out = self.module(self.frozen, self.batch(self.step, micro), alpha, lam)
                        self.acc.backward(out["loss"])
                        if self.acc.sync_gradients and t.max_grad_norm > 0:
                            self.acc.clip_grad_norm_(self.module.parameters(), t.max_grad_norm)
                        self.optimiser.step()  # the engine skips it until the last micro-batch
                        if self.acc.sync_gradients:
                            self.scheduler.step()
                        self.optimiser.zero_grad(set_to_none=True)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / t.grad_accum
                row = self._row(sums, alpha, lam, time.perf_counter() - began)
                self.step += 1
                self.log.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", step_s=f"{row['step_seconds']:.2f}")
                if t.tensorboard:
                    self.acc.log({k: v for k, v in row.items() if k != "step" and v != ""}, step=self.step)
                if self.progress is not None:
                    self.progress(self.step, t.steps, row)
                done = self.step >= t.steps
                if done or self.step % t.checkpoint_every == 0:
                    row["eval_diffusion"] = self.evaluate()
                    last_checkpoint = self.save_checkpoint()
                if t.sample_every and cfg.samples and (done or self.step % t.sample_every == 0):
                    self.write_samples()
                if not done and self.interrupted is not None and self.interrupted():
                    raise TrainingInterrupted(self.save_checkpoint())
        except BaseException as e:  # Ctrl-C, or ComfyUI's Cancel raised inside a layer: keep what was trained
            if not is_interruption(e) or self.acc.num_processes > 1:
                raise
            raise TrainingInterrupted(self.save_checkpoint()) from e
        if bar is not None:
            bar.close()
        final = self.out / f"{self.out.name}.safetensors"
        if self.main:
            self.save_adapter(final)
        self.acc.wait_for_everyone()
        if t.tensorboard:
            self.acc.end_training()
        return TrainResult(adapter_path=final, steps=self.step, log=list(self.log), curves=self.out / "curves.png",
                           last_samples=self.last_samples, checkpoint=last_checkpoint)

    def _row(self, sums: dict[str, float], alpha: float, lam: float, seconds: float) -> dict:
        keys = ("loss", "diffusion", "align", "cos_cross", "cos_self") + getattr(self.method, "log_keys", ())
        local = torch.tensor([sums.get(k, float("nan")) for k in keys], device=self.acc.device)
        mean = self.acc.reduce(local, reduction="mean").cpu().tolist()  # the global batch's mean
        row = {"step": self.step + 1, **{k: v for k, v in zip(keys, mean)}}
        row.update(alpha=alpha, align_weight=lam, lr=self.scheduler.get_last_lr()[0], step_seconds=seconds)
        return row

    # ---------------------------------------------------------------- saving

    def unwrapped(self) -> SdxlTrainModule:
        return self.acc.unwrap_model(self.module)

    def save_adapter(self, path: Path) -> None:
        """The trained file(s) as the loader nodes read them (the method decides which)."""
        self.method.save_adapter(self, path)

    def save_checkpoint(self) -> Path:
        folder = self.out / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        self.acc.save_state(str(folder))
        if self.main:
            self.save_adapter(folder / "adapter.safetensors")
            state = {"step": self.step, "data_position": self.step * self.config.train.grad_accum *
                     self.config.train.batch_size * self.acc.num_processes, "config": self.config.to_dict()}
            (folder / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            self.write_log()
            self._prune()
        self.acc.wait_for_everyone()
        return folder

    def _prune(self) -> None:
        keep = self.config.train.keep_checkpoints
        found = sorted(checkpoints(self.out))
        for old in found[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def write_log(self) -> None:
        from .report import plot_curves

        path = self.out / "log.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            for row in self.log:
                w.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        plot_curves(self.log, self.out / "curves.png", title=f"{self.config.method.name}: {self.out.name}")

    def _maybe_resume(self) -> None:
        resume = self.config.train.resume
        if not resume:
            return
        folder = latest_checkpoint(self.out) if resume == "latest" else Path(resume)
        if folder is None:
            LOG.info("train.resume = latest: no checkpoint in %s yet, starting at step 0", self.out)
            return
        if not (folder / STATE_FILE).exists():
            raise FileNotFoundError(f"train.resume: {folder} is not a checkpoint folder (no {STATE_FILE})")
        self.acc.load_state(str(folder))
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        self.step = int(state["step"])
        log = self.out / "log.csv"
        if log.exists():
            with open(log, encoding="utf-8") as f:
                self.log = [{k: int(v) if k == "step" else _num(v) for k, v in row.items() if v != ""}
                            for row in csv.DictReader(f) if int(row["step"]) <= self.step]

    # ---------------------------------------------------------------- samples and bars

    def write_samples(self) -> None:
        from .samples import sample_grid

        if self.main:
            path = self.out / "samples" / f"step-{self.step:07d}.png"
            sample_grid(self, path)
            self.last_samples = path
        self.acc.wait_for_everyone()

    def precompute(self, what: str, fill: Callable[[Callable[[], None]], None]) -> None:
        """A cache fill before the first step: ``fill(step)`` runs on the main process, calling ``step()`` after each
        record (a progress bar over the records); the other processes wait for it, then read the cache."""
        if self.main:
            bar = self._bar(len(self.records), what)
            fill(lambda: bar.update(1) if bar else None)
            if bar:
                bar.close()
        self.acc.wait_for_everyone()

    def _bar(self, total: int, what: str, initial: int = 0):
        if not (self.main and self.show_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=what, unit="step" if what == "training" else "record")


# --------------------------------------------------------------------------- helpers


def method_for(name: str):
    """The method object of ``method.name``: ``training.flux.FluxMethod`` (dynaip),
    ``training.reference.ReferenceMethod`` (mosaic) or ``training.sdxl.SdxlMethod`` (r3, ms-diffusion, multipersona).
    It sets up the frozen base and what trains, fills the feature caches, draws the samples of the data stream and
    saves the files; the loop, checkpoints, resume and logs are the trainer's."""
    from .config import FLUX_METHODS

    if name == "mosaic":
        from .reference import ReferenceMethod

        return ReferenceMethod()
    if name == "aligngen":  # a reference-branch method too: S*, the DEM and the reference LoRA
        from .aligngen import AlignGenMethod

        return AlignGenMethod()
    if name in ("focusdpo", "focusdpo-flux"):
        from .focusdpo import method_for as focusdpo_method

        return focusdpo_method(name)
    if name in FLUX_METHODS:
        from .flux import FluxMethod

        return FluxMethod()
    return SdxlMethod()


def _num(v: str):
    try:
        return float(v) if v not in ("", None) else ""
    except ValueError:
        return v


def is_interruption(error: BaseException) -> bool:
    """Ctrl-C, or ComfyUI's Cancel (``InterruptProcessingException``, raised by its layers mid-step): the step in
    progress is dropped (its optimiser update not taken) and the state before it is saved."""
    return isinstance(error, KeyboardInterrupt) or type(error).__name__ == "InterruptProcessingException"


def checkpoints(out: Path) -> list[Path]:
    return [p for p in Path(out).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()]


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(checkpoints(out))
    return found[-1] if found else None


def reset_engine_state() -> None:
    """Forget an earlier run's engine settings in this process (accelerate keeps them in singletons), so that a
    second run in one ComfyUI session or test process gets its own precision and accumulation; never inside a
    launched distributed run, whose process group the engine owns."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    if dist.is_available() and dist.is_initialized():
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def flat_config(cfg: Config) -> dict:
    out = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    out[f"{section}.{k}"] = v
    return out


def frozen_base(trainer, components: Components):
    """The base model a run trains against: the components' own when ``owned``, else a deep copy made outside
    inference mode (normal tensors, ours alone), frozen, in eval mode, on the run's device."""
    with torch.inference_mode(False):
        base = components.base_model if components.owned else own_copy(components.base_model)
    base.requires_grad_(False)
    base.eval()
    base.to(trainer.acc.device)
    trainer.base_model = base
    return base


def autocast_precision(precision: str, cpu: bool) -> str:
    """accelerate's ``mixed_precision`` for ``train.precision``: "no" for fp32, and on a CPU for every precision.
    fp16 autocast is a GPU feature, and ComfyUI itself never computes in bf16 on a CPU
    (``model_management.should_use_bf16``: "bf16 works on CPU but is extremely slow"; a 2048 x 3072 x 3072 matmul
    ran about 450 times slower in bf16 than in fp32 on the AVX2 CPU of docs/measurements.md)."""
    if cpu or precision == "fp32":
        return "no"
    return precision


def compute_dtype(base_model) -> torch.dtype:
    """The dtype a ComfyUI ``BaseModel`` computes in, as its ``_apply_model`` casts the inputs: ``manual_cast_dtype``
    when its weights are stored in a dtype the device does not compute in (bf16 / fp8 weights cast per layer),
    else the weights' dtype."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


def own_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a ComfyUI ``BaseModel`` that shares no module, parameter or buffer with it: every child module is
    deep-copied (normal tensors, outside inference mode), the rest of the object is shallow-copied. ComfyUI >= 0.33
    keeps attributes a whole-object deepcopy cannot copy."""
    out = copy.copy(model)
    out._parameters = {k: None if v is None else torch.nn.Parameter(v.detach().clone(), v.requires_grad)
                       for k, v in model._parameters.items()}
    out._buffers = {k: None if v is None else v.detach().clone() for k, v in model._buffers.items()}
    out._modules = {k: None if v is None else copy.deepcopy(v) for k, v in model._modules.items()}
    return out


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's own switch for training (``model_management.in_training``, ComfyUI >= 0.33: its FLUX RoPE then runs
    the autograd-capable torch code instead of a comfy_kitchen kernel); restored afterwards. Older hosts have no
    switch and need none."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def comfy_attention() -> Callable:
    """ComfyUI's attention function (the user's backend), the text term's and the image term's."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention


def probe_dino_width(dino) -> int:
    """The width of a DINO encoder's tokens, from one forward of a blank image of its input size."""
    side = dino.square_size(224)
    tokens = dino.tokens(torch.zeros(1, side, side, 3))
    return int(tokens.cls.shape[-1])


def train(config: Config, components: Components, **kw) -> TrainResult:
    """Run (or resume) the training ``config`` describes on ``components``; returns the adapter file and the log."""
    return Trainer(config, components, **kw).run()
