"""The training toolkit run from ComfyUI (``TroupeTrainAdapter``): the node's inputs and an optional TOML snippet
made into a config, the run folder under ComfyUI's output folder, the frozen models from the graph, and what the node
shows (the loss plot, the sample grid, the final losses). The node itself (``nodes/train.py``) only declares its
inputs and calls ``train_adapter``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..nodes import paths
from ..nodes.errors import error_text, node_error, number_error
from .config import (
    ALIGNING_METHODS,
    RESUME_LATEST,
    Config,
    ConfigError,
    parse_config,
)
from .manifest import ManifestError, Record, read_manifest

CATEGORY = "Troupe/train"
NODE = "TroupeTrainAdapter"
NONE = "none"
RUNS_FOLDER = "troupe_training"  # under ComfyUI's output folder: one run folder per output_name
MANIFEST = "manifest.jsonl"
SAMPLE_STEPS = 20
LOG = logging.getLogger(__name__)

# config keys that a node input sets: extra_config may not set them too (one place for each value)
OWNED = {("method", "name"): "method", ("method", "init_adapter"): "init_adapter", ("data", "manifest"): "dataset",
         ("data", "resolution"): "resolution", ("train", "output_dir"): "output_name", ("train", "steps"): "steps",
         ("train", "batch_size"): "batch_size", ("train", "learning_rate"): "learning_rate",
         ("train", "seed"): "seed", ("train", "resume"): "resume"}


@dataclass(frozen=True)
class TrainSettings:
    """The node's widget values."""

    dataset: str
    method: str = "r3"
    dino_model: str = NONE
    init_adapter: str = NONE
    output_name: str = "troupe_trained"
    steps: int = 200
    batch_size: int = 1
    learning_rate: float = 1e-4
    resolution: int = 1024
    seed: int = 0
    resume: bool = False
    extra_config: str = ""


@dataclass(frozen=True)
class TrainOutcome:
    """What a finished run shows: the loss curves, the last sample grid, the adapter's combo name, a summary."""

    loss_plot: torch.Tensor
    samples: torch.Tensor
    adapter_name: str
    text: str


# --------------------------------------------------------------------------- checks that need only the values


def manifest_path(dataset: str) -> Path:
    """The manifest a ``dataset`` value names: a folder's manifest.jsonl, or a .jsonl file (quotes stripped)."""
    path = Path(dataset.strip().strip('"').strip("'")).expanduser()
    return path / MANIFEST if path.is_dir() else path


def dataset_problem(dataset: str | None) -> str | None:
    if not dataset or not dataset.strip():
        return error_text(NODE, "dataset", f"empty; give a folder holding {MANIFEST} or the path of a .jsonl manifest "
                                           "(docs/training-data.md)")
    path = manifest_path(dataset)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return None
    if path.name == MANIFEST and path.parent.is_dir():
        return error_text(NODE, "dataset", f"the folder {path.parent} has no {MANIFEST}; write one "
                                           "(docs/training-data.md) or build it with "
                                           "`python troupe_train.py make-manifest FOLDER --out FOLDER/manifest.jsonl`")
    if path.is_file():
        return error_text(NODE, "dataset", f"{path} is not a .jsonl manifest; give its folder or a .jsonl file")
    return error_text(NODE, "dataset", f"no folder or file {path}; give the absolute path of the dataset folder "
                                       f"(holding {MANIFEST}) or of a .jsonl manifest")


def output_name_problem(name: str | None) -> str | None:
    stem = adapter_stem(name or "")
    bad = [c for c in ("/", "\\", ":") if c in stem]
    if not stem or bad or stem.startswith(".") or any(ord(c) < 32 for c in stem):
        return error_text(NODE, "output_name", f"expected a plain file name like troupe_trained (no folders, no "
                                               f"leading dot), got {name!r}; the adapter goes to models/troupe/"
                                               "<output_name>.safetensors")
    return None


def dino_problem(method: str | None, dino_model: str | None) -> str | None:
    found = paths.check_dino_folder(NODE, dino_model, NONE)
    if found is not True:
        return found
    if method in ALIGNING_METHODS and dino_model in (None, "", NONE):
        return error_text(NODE, "dino_model", f"'none', but method {method} has an alignment loss against DINO "
                                              "features; pick a DINOv2/DINOv3 folder from models/dino, or use method "
                                              "ms-diffusion")
    return None


def adapter_stem(name: str) -> str:
    name = name.strip()
    return name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name


# --------------------------------------------------------------------------- the config


def vision_width(clip_vision) -> int:
    """The CLIP vision model's hidden width (its last LayerNorm's): the width of the penultimate layer's tokens."""
    norms = [m for m in clip_vision.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    if not norms:
        raise node_error(NODE, "clip_vision", "no LayerNorm found to read the hidden width from; connect a CLIP "
                                              "vision model from Load CLIP Vision")
    return int(norms[-1].normalized_shape[-1])


def phrase_width(clip) -> int:
    """The width of CLIP-L's unprojected pooled output (MS-Diffusion's phrase embeddings)."""
    clip_l = getattr(getattr(clip, "cond_stage_model", None), "clip_l", None)
    norms = [m for m in clip_l.modules() if isinstance(m, torch.nn.LayerNorm)] if clip_l is not None else []
    if not norms:
        raise node_error(NODE, "clip", "this CLIP has no CLIP-L text encoder (clip_l); connect the SDXL "
                                       "checkpoint's CLIP")
    return int(norms[-1].normalized_shape[-1])


def parse_extra(text: str) -> dict:
    """The extra_config TOML snippet as a dict; refuses keys that the node's inputs set."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        extra = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        raise node_error(NODE, "extra_config", f"not valid TOML ({e}); write sections like [adapter] with "
                                               "key = value lines") from None
    if "model" in extra:
        raise node_error(NODE, "extra_config", "[model]: the graph supplies the models (model, clip, vae, "
                                               "clip_vision, dino_model inputs); remove the [model] section")
    for (section, key), owner in OWNED.items():
        if isinstance(extra.get(section), dict) and key in extra[section]:
            raise node_error(NODE, "extra_config", f"{section}.{key}: set by the node's '{owner}' input; remove it "
                                                   "from extra_config")
    return extra


def first_record_sample(record: Record, run_dir: Path, resolution: int, seed: int) -> dict:
    """A [[sample]] case from the dataset's first record: its caption, each subject's first reference (or its
    target crop, saved in the run folder) and box, at the run's resolution."""
    from ..training.data import box_pixels, load_rgb

    subjects = []
    for j, s in enumerate(record.subjects):
        image = s.references[0] if s.references else None
        if image is None:
            target = load_rgb(record.image)
            top, bottom, left, right = box_pixels(s.box, target.shape[0], target.shape[1])
            image = run_dir / "sample_inputs" / f"subject_{j + 1}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            crop = (target[top:bottom, left:right].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(crop).save(image)
        subjects.append({"label": s.label, "image": str(image), "box": list(s.box)})
    return {"prompt": record.caption, "width": resolution, "height": resolution, "seed": seed, "steps": SAMPLE_STEPS,
            "subjects": subjects}


def config_data(s: TrainSettings, manifest: Path, run_dir: Path, image_width: int, phrase_dim: int,
                sample: dict | None) -> dict:
    """The config as a dict: the node's values, then extra_config merged over them section by section."""
    data = {
        "model": {"checkpoint": "(graph: model input)", "clip_vision": "(graph: clip_vision input)",
                  "dino": "" if s.method not in ALIGNING_METHODS else s.dino_model},
        "method": {"name": s.method, "init_adapter": "" if s.init_adapter == NONE else s.init_adapter},
        "adapter": {"image_width": image_width, "phrase_dim": phrase_dim},
        "data": {"manifest": str(manifest), "resolution": s.resolution},
        "train": {"output_dir": str(run_dir), "steps": s.steps, "batch_size": s.batch_size,
                  "learning_rate": s.learning_rate, "seed": s.seed, "resume": RESUME_LATEST if s.resume else "",
                  "sample_every": s.steps},
    }
    extra = parse_extra(s.extra_config)
    for section, values in extra.items():
        if section == "sample":
            continue
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values  # parse_config names what is wrong with it
    if "sample" in extra:
        data["sample"] = extra["sample"]
    elif sample is not None:
        data["sample"] = [sample]
    return data


def config_error(e: ConfigError, own_sample: bool) -> ValueError:
    """A ConfigError as the node's error, naming the input that set the dotted key it starts with."""
    message = str(e)
    key = message.split(":", 1)[0].strip()
    parts = key.split(".")
    owner = OWNED.get((parts[0], parts[1])) if len(parts) > 1 else None
    if key == "model.dino":
        owner = "dino_model"
    elif key.startswith("sample") and own_sample:
        owner = "dataset"
        message = f"the sample case made from the dataset's first record: {message}"
    return node_error(NODE, owner or "extra_config", message)


def build_config(s: TrainSettings, clip, clip_vision, run_dir: Path) -> tuple[Config, list[Record]]:
    """The validated config and the manifest's records (ConfigError / ManifestError as the node's errors)."""
    manifest = manifest_path(s.dataset)
    try:
        records = read_manifest(manifest)
    except ManifestError as e:
        raise node_error(NODE, "dataset", f"{e}; fix these lines (check them with `python troupe_train.py validate "
                                          f"{manifest}`)") from None
    if not records:
        raise node_error(NODE, "dataset", f"{manifest} has no records; add one JSON line per training image")
    extra = parse_extra(s.extra_config)
    sample = None if "sample" in extra else first_record_sample(records[0], run_dir, s.resolution, s.seed)
    data = config_data(s, manifest, run_dir, vision_width(clip_vision), phrase_width(clip), sample)
    try:
        return parse_config(data, manifest.parent), records
    except ConfigError as e:
        raise config_error(e, own_sample=sample is not None) from None


# --------------------------------------------------------------------------- the run


def run_dir_for(name: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / RUNS_FOLDER / adapter_stem(name)


def adapter_target(name: str) -> Path:
    """models/troupe/<name>.safetensors: the first troupe folder (the one extra_model_paths.yaml names, if any)."""
    import folder_paths

    folders = folder_paths.get_folder_paths("troupe") if "troupe" in folder_paths.folder_names_and_paths else []
    folder = Path(folders[0]) if folders else Path(folder_paths.models_dir) / "troupe"
    return folder / f"{adapter_stem(name)}.safetensors"


def check_run_folder(s: TrainSettings, run_dir: Path, target: Path) -> None:
    """Never mix two runs: a fresh run needs an unused run folder, and never overwrites another adapter file."""
    from ..training.trainer import latest_checkpoint

    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is not None and not s.resume:
        raise node_error(NODE, "resume", f"the run folder {run_dir} already holds a run ({latest.name}); turn resume "
                                         "on to continue it, or pick a new output_name")
    if target.exists() and not run_dir.is_dir():
        raise node_error(NODE, "output_name", f"{target} already exists and was not made by a run in {run_dir}; "
                                              "pick another output_name")


def initial_adapter(name: str, image_width: int):
    """The SdxlAdapter module to start from, or None; refused unless an MS-Diffusion or R^3 file of this width."""
    if name in (None, "", NONE):
        return None
    from ..models.adapter_file import AdapterFormatError, detect_and_load, read_state_dict
    from .adapter import families

    path = paths.full_path(NODE, "init_adapter", paths.ADAPTER_FOLDERS, name)
    try:
        adapter = detect_and_load(read_state_dict(path), families(), filename=name)
    except AdapterFormatError as e:
        raise node_error(NODE, "init_adapter", f"{name}: {e}") from None
    module = adapter.module
    if adapter.family != "sdxl" or getattr(module, "semantics", None) != "joint":
        raise node_error(NODE, "init_adapter", f"{name} is a {adapter.family} {adapter.format} file; training "
                                               "continues an MS-Diffusion or R^3 SDXL file, or pick 'none'")
    if module.image_width != image_width:
        raise node_error(NODE, "init_adapter", f"{name} reads CLIP vision features of width {module.image_width} "
                                               f"but clip_vision gives {image_width}; load the CLIP vision model "
                                               "it was trained with (MS-Diffusion: ViT-bigG)")
    return module


def dino_encoder(name: str):
    """A HF DINO folder from models/dino on ComfyUI's torch device (the trainer reads it while caching features)."""
    import comfy.model_management

    from ..models.encoding.dino import DinoModelError, load_hf_dino

    try:
        encoder = load_hf_dino(paths.hf_folder_path("dino", name))
    except (ValueError, DinoModelError) as e:
        raise node_error(NODE, "dino_model", str(e)) from None
    device = comfy.model_management.get_torch_device()
    encoder.model.to(device)
    return replace(encoder, device=device)


def as_image(path: Path | None, fallback: str) -> torch.Tensor:
    """A PNG as IMAGE [1, H, W, 3]; a small grey card with ``fallback`` when there is none."""
    if path is not None and Path(path).is_file():
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    else:
        card = Image.new("RGB", (384, 96), "#d9d9d9")
        ImageDraw.Draw(card).text((10, 38), fallback, fill="#222222")
        pixels = np.asarray(card, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


def latest_samples(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "samples").glob("step-*.png"))
    return found[-1] if found else None


def finite(row: dict, key: str) -> float | None:
    try:
        value = float(row.get(key, ""))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def losses_text(config: Config, steps: int, log: list[dict], adapter: Path, run_dir: Path) -> str:
    """The final losses (the last step's, and the mean over the last tenth of the run) and where the files are."""
    lines = [f"{config.method.name}: {steps} of {config.train.steps} steps"]
    keys = ["loss", "diffusion", "align", "cos_cross", "cos_self"]
    keys += [k for k in (log[-1] if log else {}) if k.startswith("eval_")]  # held-out losses, when the trainer logs them
    for key in keys:
        values = [v for v in (finite(r, key) for r in log) if v is not None]
        if not values:
            continue
        tail = values[-max(1, len(values) // 10):]
        lines.append(f"{key}: {values[-1]:.4f}" + (f" (mean of the last {len(tail)}: {np.mean(tail):.4f})"
                                                   if len(tail) > 1 else ""))
    lines += [f"adapter: {adapter} (pick it in TroupeLoadAdapter)", f"run folder: {run_dir}"]
    return "\n".join(lines)


def publish(adapter: Path, target: Path) -> str:
    """Copy the adapter into models/troupe (atomically) and return the name TroupeLoadAdapter lists it under."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(adapter, tmp)
    tmp.replace(target)
    real = os.path.realpath(target)
    for name, path in paths.files_in(paths.ADAPTER_FOLDERS).items():
        if os.path.realpath(path) == real:
            return name
    return target.name


def train_adapter(model, clip, vae, clip_vision, s: TrainSettings) -> TrainOutcome:
    """Check everything, build the config, train on a copy of the model (resumable on Cancel), publish the file."""
    import comfy.model_management
    import comfy.utils

    from ..training.trainer import Components, Trainer, TrainingInterrupted

    for problem in (dataset_problem(s.dataset), output_name_problem(s.output_name),
                    dino_problem(s.method, s.dino_model),
                    number_error(NODE, "learning_rate", s.learning_rate, 1e-8, 1.0)):
        if problem is not None:
            raise ValueError(problem)
    if importlib.util.find_spec("accelerate") is None:
        raise node_error(NODE, None, "training needs the 'accelerate' package; install it into ComfyUI's Python "
                                     "(pip install accelerate) and restart ComfyUI")
    run_dir, target = run_dir_for(s.output_name), adapter_target(s.output_name)
    check_run_folder(s, run_dir, target)
    config, _ = build_config(s, clip, clip_vision, run_dir)
    initial = initial_adapter(s.init_adapter, vision_width(clip_vision))
    dino = dino_encoder(s.dino_model) if config.method.aligns else None
    if getattr(model, "patches", None):
        LOG.warning("%s: MODEL carries weight patches (a LoRA?); training uses the model's own weights without them",
                    NODE)
    comfy.model_management.unload_all_models()  # the trainer's copy of the UNet needs the memory
    components = Components(base_model=model.model, clip=clip, vae=vae, clip_vision=clip_vision, dino=dino,
                            initial_adapter=initial, owned=False)
    bar = comfy.utils.ProgressBar(config.train.steps)
    LOG.info("%s: training %s for %d steps in %s", NODE, config.method.name, config.train.steps, run_dir)
    trainer = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            trainer = Trainer(config, components, progress=lambda step, total, row: bar.update_absolute(step, total),
                              interrupted=comfy.model_management.processing_interrupted, show_bar=False)
            result = trainer.run()
    except ConfigError as e:  # what the trainer checks itself (e.g. tensorboard = true without the package)
        raise config_error(e, own_sample=False) from None
    except TrainingInterrupted as e:  # the trainer saw Cancel between two steps and saved a checkpoint
        log_cancel(e.checkpoint)
        comfy.model_management.interrupt_current_processing(False)
        raise comfy.model_management.InterruptProcessingException() from None
    except comfy.model_management.InterruptProcessingException:
        # ComfyUI's ops check the Cancel flag at every layer, so Cancel usually stops a step before the trainer's own
        # check: the step in progress is dropped (its optimiser step not taken) and the state before it saved
        if trainer is not None:
            with torch.inference_mode(False):
                log_cancel(trainer.save_checkpoint())
        raise
    finally:
        comfy.model_management.soft_empty_cache()
    name = publish(result.adapter_path, target)
    return TrainOutcome(loss_plot=as_image(result.curves, "no loss curves yet"),
                        samples=as_image(result.last_samples or latest_samples(run_dir),
                                         "no sample grid (train.sample_every = 0 or no [[sample]])"),
                        adapter_name=name, text=losses_text(config, result.steps, result.log, target, run_dir))


def log_cancel(checkpoint: Path) -> None:
    LOG.warning("%s: training cancelled; the resumable checkpoint is %s (queue again with resume on to continue)",
                NODE, checkpoint)


# --------------------------------------------------------------------------- node
