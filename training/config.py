"""The training config: a TOML file validated into frozen dataclasses (``load_config``, ``parse_config``).

Sections: [model], [method], [adapter], [data], [train], [dropout] and zero or more [[sample]] cases. Every
default names its source (R^3-Adapter, MultiPersona-Align, MS-Diffusion's published adapter file, IP-Adapter)
or says it is our choice. Relative paths resolve against the config file's folder; model names
(``model.checkpoint``, ``model.clip_vision``, ``model.dino``, ``method.init_adapter``) stay as written, since they
may name files in ComfyUI's model folders, which the trainer resolves. Every error is a ``ConfigError`` whose
message starts with the dotted key (``train.steps: expected a positive integer, got -3``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.layout.layout import LayoutError, validate_box
from .manifest import MAX_SUBJECTS, label_in_caption

METHODS = ("r3", "ms-diffusion", "multipersona", "dynaip", "mosaic", "aligngen", "focusdpo", "focusdpo-flux")
FLUX_METHODS = ("dynaip", "mosaic", "aligngen", "focusdpo-flux")  # methods that train a FLUX adapter (the rest train SDXL adapters)
REFERENCE_METHODS = ("mosaic", "aligngen")  # FLUX methods that train the reference branch (training/reference.py): no CLIP vision
SDXL_METHODS = tuple(m for m in METHODS if m not in FLUX_METHODS)
PREFERENCE_METHODS = ("focusdpo", "focusdpo-flux")  # tune a trained adapter on preference pairs (training/focusdpo.py)
FLUX_MODEL_KEYS = ("unet", "clip_l", "t5", "vae")  # the separate FLUX files a FLUX method needs
# DynaIP "Implementation Details": AdamW, cosine schedule from 2e-5, weight decay 1e-4; the defaults of a dynaip run
DYNAIP_TRAIN_DEFAULTS = {"learning_rate": 2e-5, "lr_schedule": "cosine", "weight_decay": 1e-4}
# mosaic: the reference LoRA alone trains; 1e-4 constant is our choice (diffusers' FLUX LoRA trainers' default rate;
# MOSAIC's abstract gives none), weight decay as dynaip
MOSAIC_TRAIN_DEFAULTS = {"learning_rate": 1e-4, "lr_schedule": "constant", "weight_decay": 1e-4}
# aligngen: weight decay 0.01 as AlignGen "Implementation details" (with Prodigy); 1e-4 constant for AdamW is our choice
ALIGNGEN_TRAIN_DEFAULTS = {"learning_rate": 1e-4, "lr_schedule": "constant", "weight_decay": 0.01}
ATTENTION_LAYER_SETS = ("double", "single", "all")  # or a list: "double_blocks.3,single_blocks.10"
ALIGNING_METHODS = ("r3", "multipersona")  # methods with an alignment loss against DINO features
ALIGN_BLOCKS = ("down+mid", "down", "mid")
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "prodigy")  # prodigy: AlignGen's optimiser, only when the optional prodigyopt package is installed
PRECISIONS = ("fp32", "bf16", "fp16")
RESUME_LATEST = "latest"


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key, what was expected and the fix."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the frozen models the adapter trains against."""

    checkpoint: str = ""
    """SDXL checkpoint: a path, or a file name in ComfyUI's models/checkpoints (the trainer resolves it); required
    by the SDXL methods."""
    clip_vision: str = ""
    """CLIP vision encoder (ViT-bigG/14 for MS-Diffusion-sized adapters, OpenCLIP ViT-L/14-336 for DynaIP): a path
    or a name in models/clip_vision; required."""
    dino: str = ""
    """DINO encoder for the alignment loss: a folder in models/dino or a path; required by r3 and multipersona."""
    comfyui: Path | None = None
    """ComfyUI folder whose loaders and model folders the trainer uses; None ("" in the file) = the host one."""
    unet: str = ""
    """FLUX methods: the FLUX.1-dev diffusion model, a path or a name in models/diffusion_models (or unet)."""
    clip_l: str = ""
    """FLUX methods: the CLIP-L text encoder, a path or a name in models/text_encoders (or clip)."""
    t5: str = ""
    """FLUX methods: the T5-XXL text encoder, a path or a name in models/text_encoders (or clip)."""
    vae: str = ""
    """FLUX methods: the FLUX VAE (16 latent channels, ae.safetensors), a path or a name in models/vae."""
    redux: str = ""
    """aligngen: the FLUX Redux style model (flux1-redux-dev.safetensors) whose tokens the DEM reads, a path or a name
    in models/style_models; with model.clip_vision = the SigLIP encoder Redux takes."""


@dataclass(frozen=True)
class MethodConfig:
    """[method]: what is trained and with which losses."""

    name: str
    """One of METHODS: "r3" (R^3-Adapter), "ms-diffusion" (MS-Diffusion), "multipersona" (MultiPersona-Align)."""
    init_adapter: str = ""
    """Adapter file to start from (a path or a name in models/ipadapter or models/troupe); "" = new, sized by [adapter]."""
    align_weight: float = 0.01
    """lambda_align, the alignment loss weight: R^3-Adapter A.1 and MultiPersona-Align Sec. 4.1."""
    align_blocks: str = "down+mid"
    """UNet blocks whose features are aligned with DINO: R^3-Adapter Sec. 3.4.2 / A.2 ("down+mid")."""
    phase1_steps: int = 1000
    """R^3-Adapter A.1 phase 1: the refiner's alpha is 0 and the alignment loss is off for these steps."""
    ramp_steps: int = 1000
    """R^3-Adapter A.1 phase 2: alpha rises linearly from 0 to 1 over these steps."""
    projection_width: int = 512
    """Hidden width of the projection W2 W1 of the alignment loss, R^3-Adapter Eq. 7."""
    projector_dropout: float = 0.1
    """Dropout of MultiPersona-Align's projector (its Eq. 7); our choice: the paper gives no rate."""
    stage1_steps: int = 20000
    """dynaip: steps of stage 1 (intra-pair records only) before stage 2 (cross-pair records only); DynaIP
    "Implementation Details" (20,000 then 80,000 iterations)."""
    expert_dropout: float = 0.05
    """dynaip: each HMoE expert's feature is dropped independently with this rate in training; DynaIP
    "Implementation Details"."""
    reference_dropout: float = 0.5
    """aligngen: rate of random reference dropout (the reference image replaced by a black image); AlignGen
    "Training Strategy" and Table 3 (0.5)."""
    concept_substitution: float = 0.5
    """aligngen: probability that a subject's label in the caption is replaced by its manifest ``parent_class`` or
    ``category`` (one of them, equally likely); AlignGen "Training Strategy" gives no rate: our choice."""
    s_star_name: str = "aligngen_s_star"
    """aligngen: file name (without .safetensors) of the S* embedding the run writes; the prompt names it as
    ``embedding:<s_star_name>``."""
    s_star_init: str = "object"
    """aligngen: the word whose T5 input embedding (its first token) S* starts from (Textual Inversion's coarse
    descriptor start); our choice."""
    dem_heads: int = 8
    """aligngen: attention heads of the DEM (the file's ``heads``); AlignGen gives none: our choice."""
    dem_mlp_ratio: float = 4.0
    """aligngen: hidden width of the DEM's MLP over the T5 width (Eq. 5); our choice (a transformer's usual 4)."""
    lora_rank: int = 16
    """mosaic: rank of the reference LoRA (AlignGen's rank-16 reference LoRA, "Training Strategy"; MOSAIC's abstract
    gives none); docs/training.md, "mosaic"."""
    correspondence_weight: float = 0.1
    """mosaic: weight of the semantic correspondence attention loss (a cross-entropy, log R at the start); our
    choice, docs/training.md "mosaic"."""
    disentangle_weight: float = 0.1
    """mosaic: weight of the multi-reference disentanglement loss (squared cosine, in [0, 1]); our choice."""
    attention_layers: str = "double"
    """mosaic: the blocks whose attention the two losses read: "double", "single", "all" or a comma list like
    "double_blocks.9,single_blocks.0"; our choice (the double blocks, where image and references keep their own
    projections)."""
    attention_rows: int = 256
    """mosaic: at most this many image rows (an even stride over the image tokens) enter the disentanglement loss per
    layer; explicit attention rows cost rows x keys x heads floats; our choice."""

    dpo_beta: float = 5000.0
    """focusdpo: beta of the Diffusion-DPO loss (Wallace et al. 2023; 5000, the SD1.5/SDXL value of its released
    training scripts)."""
    focus_strength: float = 1.0
    """focusdpo: how much the focus map adds over uniform weights (F = 1 + strength * sum_i g_i m_i); 0 = plain
    Diffusion-DPO; our choice (FocusDPO's abstract gives no value)."""
    focus_gamma: float = 1.0
    """focusdpo: shape of the timestep schedule s = (1 - t/1000)^gamma (uniform at high noise, the whole map at
    t = 0); 1 = linear; our choice."""
    confidence_kappa: float = 1.0
    """focusdpo: how strongly patches where the tuned model errs more than the reference are down-weighted
    (c = exp(-kappa * excess / mean reference error)); 0 = off; our choice."""
    focus_patch: int = 2
    """focusdpo: side of a focus patch in latent pixels (2 = 16 image pixels, near DINO's 14-pixel patch)."""
    focus_floor: float = 0.1
    """focusdpo: weight a matched but perfectly flat reference patch keeps (complexity floor); our choice."""

    @property
    def flux(self) -> bool:
        """Whether this method trains a FLUX adapter (and so needs the [model] FLUX files)."""
        return self.name in FLUX_METHODS

    @property
    def aligns(self) -> bool:
        """Whether this method has an alignment loss (and so needs model.dino)."""
        return self.name in ALIGNING_METHODS


@dataclass(frozen=True)
class AdapterConfig:
    """[adapter]: sizes of a new adapter (used when method.init_adapter is ""); MS-Diffusion's published file."""

    tokens: int = 16
    """Query tokens per subject of the resampler."""
    resampler_dim: int = 1280
    """Width of the resampler."""
    resampler_depth: int = 4
    """Resampler layers."""
    resampler_heads: int = 20
    """Attention heads of the resampler."""
    resampler_dim_head: int = 64
    """Width of one resampler head."""
    ff_mult: int = 4
    """Feed-forward expansion of the resampler."""
    image_width: int = 1664
    """Width of the image features: CLIP ViT-bigG/14's penultimate layer."""
    phrase_dim: int = 768
    """Width of the grounding phrase embeddings."""
    dummy_tokens: int = 4
    """Learned dummy tokens that absorb attention outside the boxes."""
    refiner_heads: int = 32
    """Heads of the R^3-Adapter refiner's attention."""
    refiner_window: int = 4
    """Window size of the refiner's local attention."""
    refiner_topk: tuple[int, int] = (8, 4)
    """Top-k routing of the refiner, two positive ints."""
    fusion_width: int = 0
    """dynaip: the HMoE experts' output width E (the adapter's input); 0 = the CLIP vision width (1024 for ViT-L)."""
    router_hidden: int = 256
    """dynaip: hidden width of the HMoE router (the pack's ``HMoEConfig`` default)."""


@dataclass(frozen=True)
class DataConfig:
    """[data]: the dataset and how it is prepared."""

    manifest: Path
    """The JSONL manifest (docs/training-data.md)."""
    resolution: int = 1024
    """Training resolution in pixels (a multiple of 64, at least 64); SDXL's native 1024."""
    cache_dir: Path | None = None
    """Where encoded features are cached; "" in the file = <train.output_dir>/cache (filled in by parse_config)."""
    dino_resolution: int = 224
    """Side of the DINO encoder's input."""


@dataclass(frozen=True)
class TrainConfig:
    """[train]: the optimisation run."""

    output_dir: Path
    """Where checkpoints, samples, logs and the saved config go."""
    steps: int
    """Optimiser steps."""
    batch_size: int = 1
    """Records per step per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    learning_rate: float = 1e-4
    """AdamW learning rate: IP-Adapter's (Ye et al. 2023, Sec. 4.1); the R^3 and MultiPersona papers give none."""
    lr_schedule: str = "constant"
    """One of LR_SCHEDULES, after the warmup."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to learning_rate."""
    weight_decay: float = 0.01
    """AdamW weight decay: IP-Adapter's."""
    optimizer: str = "adamw"
    """One of OPTIMIZERS: "adamw" (torch's AdamW), or "prodigy" (AlignGen's optimiser, Prodigy with safeguard warmup
    and bias correction; needs ``pip install prodigyopt``; its learning_rate is a multiplier, 1.0 usual)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 = no clipping."""
    precision: str = "bf16"
    """One of PRECISIONS: the autocast dtype of the frozen models."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass (less memory, slower)."""
    seed: int = 0
    """Seed of the run's random numbers."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    sample_every: int = 500
    """Steps between renders of the [[sample]] cases; 0 = never."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept in output_dir; older ones are deleted."""
    resume: str = ""
    """"" = fresh run, "latest" = newest checkpoint in output_dir, else a checkpoint folder (made absolute)."""
    tensorboard: bool = False
    """Write TensorBoard logs to output_dir."""


@dataclass(frozen=True)
class DropoutConfig:
    """[dropout]: classifier-free-guidance dropout rates; IP-Adapter's (Ye et al. 2023, Sec. 4.1), the SDXL papers give none."""

    text: float = 0.05
    """Drop the caption only."""
    image: float = 0.05
    """Drop the subjects only."""
    both: float = 0.05
    """Drop caption and subjects together."""


@dataclass(frozen=True)
class SampleSubject:
    """[[sample.subjects]]: one subject of a sample case."""

    label: str
    """The word naming the subject; it must occur in the sample's prompt as a whole word (case-insensitive)."""
    image: Path
    """The subject's reference photo."""
    box: tuple[float, float, float, float]
    """Normalised [x0, y0, x1, y1], 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1."""


@dataclass(frozen=True)
class SampleCase:
    """[[sample]]: one fixed case rendered every train.sample_every steps."""

    prompt: str
    """The prompt; every subject's label must occur in it."""
    width: int = 1024
    """Image width in pixels, a multiple of 8."""
    height: int = 1024
    """Image height in pixels, a multiple of 8."""
    seed: int = 0
    """Sampling seed."""
    steps: int = 20
    """Sampling steps."""
    cfg: float = 5.0
    """Classifier-free guidance scale."""
    subjects: tuple[SampleSubject, ...] = ()
    """At most 8 subjects."""


@dataclass(frozen=True)
class Config:
    """A validated training config; ``to_dict()`` is the same config as plain values (saved next to checkpoints)."""

    model: ModelConfig
    """[model]: the frozen SDXL checkpoint, CLIP vision and DINO encoders, and the ComfyUI to load them with."""
    method: MethodConfig
    """[method]: r3, ms-diffusion or multipersona, and the alignment loss and refiner schedule."""
    data: DataConfig
    """[data]: the manifest, the training resolution and the feature cache."""
    train: TrainConfig
    """[train]: steps, optimiser, precision, checkpoints, samples and resuming."""
    adapter: AdapterConfig = AdapterConfig()
    """[adapter]: the sizes of a new adapter (MS-Diffusion's by default)."""
    dropout: DropoutConfig = DropoutConfig()
    """[dropout]: classifier-free-guidance dropout rates."""
    samples: tuple[SampleCase, ...] = ()
    """The [[sample]] cases (key "sample" in the file and in to_dict)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML values (absolute paths, "" for unset); ``parse_config`` reads it back to an equal Config."""
        out = {name: _plain(getattr(self, name)) for name in _SECTIONS}
        out["sample"] = [_plain(s) for s in self.samples]
        return out


_SECTIONS = {"model": ModelConfig, "method": MethodConfig, "adapter": AdapterConfig, "data": DataConfig,
             "train": TrainConfig, "dropout": DropoutConfig}
# an example value for each required key, quoted in the "missing" message
_EXAMPLES = {"checkpoint": '"sd_xl_base_1.0.safetensors"', "unet": '"flux1-dev.safetensors"',
             "clip_l": '"clip_l.safetensors"', "t5": '"t5xxl_fp16.safetensors"', "vae": '"ae.safetensors"', "clip_vision": '"CLIP-ViT-bigG-14.safetensors"',
             "name": '"r3"', "manifest": '"data/manifest.jsonl"', "output_dir": '"runs/r3"', "steps": "20000",
             "prompt": '"a dog and a teapot on a table"', "label": '"dog"', "image": '"refs/dog.jpg"',
             "box": "[0.1, 0.2, 0.5, 0.9]"}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- typed reading of one table


def _show(value: Any) -> str:
    """A value as the TOML file spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    return repr(value)


class _Table:
    """One TOML table being read into dataclass ``cls``: typed getters raising ConfigError at ``where.key``."""

    def __init__(self, where: str, data: Any, cls: type, base_dir: Path, header: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table ({header}), got {_show(data)}")
        self.where, self.data, self.base_dir, self.header = where, data, base_dir, header
        self.fields = {f.name: f for f in dataclasses.fields(cls)}
        known = sorted(self.fields)
        for key in data:
            if key not in self.fields:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise ConfigError(f"{where}.{key}: unknown key; {hint}{header} takes {', '.join(known)}")

    def raw(self, key: str) -> tuple[Any, bool]:
        """(value, given): the file's value, or the dataclass default; a missing required key raises."""
        if key in self.data:
            return self.data[key], True
        f = self.fields[key]
        if f.default is dataclasses.MISSING:
            example = _EXAMPLES.get(key, "...")
            raise ConfigError(f"{self.where}.{key}: required key is missing; add it under {self.header}, "
                              f"e.g. {key} = {example}")
        return f.default, False

    def fail(self, key: str, expected: str, value: Any, fix: str = "") -> ConfigError:
        return ConfigError(f"{self.where}.{key}: expected {expected}, got {_show(value)}" + (f"; {fix}" if fix else ""))

    def text(self, key: str, nonempty: bool = False) -> str:
        value, _ = self.raw(key)
        if not isinstance(value, str) or (nonempty and not value.strip()):
            raise self.fail(key, "a non-empty string" if nonempty else "a string", value)
        return value

    def integer(self, key: str, minimum: int | None = None, multiple: int = 1) -> int:
        value, _ = self.raw(key)
        if minimum == 1:
            expected = "a positive integer"
        elif minimum == 0:
            expected = "a non-negative integer"
        else:
            expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        if multiple > 1:
            expected += f" that is a multiple of {multiple}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, expected, value, "write a whole number without quotes" if not isinstance(value, bool)
                            else "booleans are not numbers here")
        if (minimum is not None and value < minimum) or value % multiple:
            raise self.fail(key, expected, value)
        return value

    def number(self, key: str, lo: float, hi: float = math.inf, hi_open: bool = False, lo_open: bool = False) -> float:
        value, _ = self.raw(key)
        if hi == math.inf:
            expected = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, expected, value)
        if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
            raise self.fail(key, expected, value)
        return float(value)

    def boolean(self, key: str) -> bool:
        value, _ = self.raw(key)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value, _ = self.raw(key)
        if value not in options or not isinstance(value, str):
            close = difflib.get_close_matches(str(value), options, n=1)
            raise self.fail(key, "one of " + ", ".join(json.dumps(o) for o in options), value,
                            f'did you mean "{close[0]}"?' if close else "")
        return value

    def path(self, key: str) -> Path | None:
        """A path resolved against the config's folder; None for "" (an optional path left unset)."""
        value, given = self.raw(key)
        if not given and value is None:
            return None
        value = self.text(key)
        return resolve_path(value, self.base_dir) if value.strip() else None

    def required_path(self, key: str) -> Path:
        path = self.path(key)
        if path is None:
            raise self.fail(key, "a path", "", "give a path (relative paths start at the config's folder)")
        return path

    def int_pair(self, key: str) -> tuple[int, int]:
        value, _ = self.raw(key)
        if not isinstance(value, (list, tuple)) or len(value) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise self.fail(key, "a list of 2 positive integers like [8, 4]", value)
        return (value[0], value[1])


def resolve_path(value: str | os.PathLike, base_dir: Path) -> Path:
    """An absolute path: ``value`` as given when absolute, else relative to base_dir (``~`` expanded)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(base_dir).absolute() / path


# --------------------------------------------------------------------------- sections


def _required_text(t: _Table, key: str, why: str = "") -> str:
    if key not in t.data:
        example = _EXAMPLES.get(key, "...")
        raise ConfigError(f"{t.where}.{key}: required key is missing{why}; add it under {t.header}, e.g. {key} = {example}")
    return t.text(key, nonempty=True)


def _model(t: _Table, method: str = "r3") -> ModelConfig:
    flux = method in FLUX_METHODS
    files = {}
    for key in FLUX_MODEL_KEYS:
        files[key] = (_required_text(t, key, f' (method.name "{method}" trains on FLUX)') if flux
                      else t.text(key).strip())
    checkpoint = t.text("checkpoint").strip() if flux else _required_text(t, "checkpoint")
    vision = t.text("clip_vision").strip() if method in REFERENCE_METHODS else _required_text(t, "clip_vision")
    return ModelConfig(checkpoint=checkpoint, clip_vision=vision,
                       dino=t.text("dino").strip(), comfyui=t.path("comfyui"), redux=t.text("redux").strip(), **files)


def _method(t: _Table) -> MethodConfig:
    return MethodConfig(
        name=t.choice("name", METHODS), init_adapter=t.text("init_adapter").strip(),
        align_weight=t.number("align_weight", 0.0), align_blocks=t.choice("align_blocks", ALIGN_BLOCKS),
        phase1_steps=t.integer("phase1_steps", 0), ramp_steps=t.integer("ramp_steps", 0),
        projection_width=t.integer("projection_width", 1),
        projector_dropout=t.number("projector_dropout", 0.0, 1.0, hi_open=True),
        stage1_steps=t.integer("stage1_steps", 0), expert_dropout=t.number("expert_dropout", 0.0, 1.0, hi_open=True),
        reference_dropout=t.number("reference_dropout", 0.0, 1.0),
        concept_substitution=t.number("concept_substitution", 0.0, 1.0), s_star_name=_file_stem(t, "s_star_name"),
        s_star_init=t.text("s_star_init", nonempty=True).strip(), dem_heads=t.integer("dem_heads", 1),
        dem_mlp_ratio=t.number("dem_mlp_ratio", 0.0, lo_open=True),
        lora_rank=t.integer("lora_rank", 1), correspondence_weight=t.number("correspondence_weight", 0.0),
        disentangle_weight=t.number("disentangle_weight", 0.0), attention_layers=_attention_layers(t),
        attention_rows=t.integer("attention_rows", 1),
        dpo_beta=t.number("dpo_beta", 0.0, lo_open=True), focus_strength=t.number("focus_strength", 0.0),
        focus_gamma=t.number("focus_gamma", 0.0), confidence_kappa=t.number("confidence_kappa", 0.0),
        focus_patch=t.integer("focus_patch", 1), focus_floor=t.number("focus_floor", 0.0, 1.0),
    )


def _attention_layers(t: _Table) -> str:
    value = t.text("attention_layers").strip()
    names = [v.strip() for v in value.split(",")]
    if value in ATTENTION_LAYER_SETS or (value and all(
            n.startswith(("double_blocks.", "single_blocks.")) and n.split(".", 1)[1].isdigit()
            for n in names)):
        return value
    raise t.fail("attention_layers", '"double", "single", "all" or block names like "double_blocks.9,single_blocks.0"',
                 value)


def _adapter(t: _Table) -> AdapterConfig:
    sizes = {name: t.integer(name, 0 if name == "fusion_width" else 1) for name in t.fields if name != "refiner_topk"}
    return AdapterConfig(**sizes, refiner_topk=t.int_pair("refiner_topk"))


def _data(t: _Table, output_dir: Path) -> DataConfig:
    return DataConfig(manifest=t.required_path("manifest"), resolution=t.integer("resolution", 64, multiple=64),
                      cache_dir=t.path("cache_dir") or output_dir / "cache",
                      dino_resolution=t.integer("dino_resolution", 1))


def _train(t: _Table) -> TrainConfig:
    resume = t.text("resume").strip()
    if resume and resume != RESUME_LATEST:
        resume = str(resolve_path(resume, t.base_dir))
    return TrainConfig(
        output_dir=t.required_path("output_dir"), steps=t.integer("steps", 1), batch_size=t.integer("batch_size", 1),
        grad_accum=t.integer("grad_accum", 1), learning_rate=t.number("learning_rate", 0.0, lo_open=True),
        lr_schedule=t.choice("lr_schedule", LR_SCHEDULES), warmup_steps=t.integer("warmup_steps", 0),
        weight_decay=t.number("weight_decay", 0.0), max_grad_norm=t.number("max_grad_norm", 0.0),
        precision=t.choice("precision", PRECISIONS), gradient_checkpointing=t.boolean("gradient_checkpointing"),
        seed=t.integer("seed", 0), checkpoint_every=t.integer("checkpoint_every", 1),
        sample_every=t.integer("sample_every", 0), keep_checkpoints=t.integer("keep_checkpoints", 1),
        resume=resume, tensorboard=t.boolean("tensorboard"), optimizer=_optimizer(t),
    )


def _optimizer(t: _Table) -> str:
    name = t.choice("optimizer", OPTIMIZERS)
    if name == "prodigy":
        prodigy_class(f"{t.where}.optimizer")
    return name


def prodigy_class(key: str = "train.optimizer"):
    """prodigyopt's ``Prodigy`` (AlignGen "Implementation details"), or a ConfigError saying how to install it."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError(f'{key}: "prodigy" needs the optional prodigyopt package, which this Python cannot import; '
                          "install it into ComfyUI's Python with `python -m pip install prodigyopt`, or set "
                          'optimizer = "adamw" (the default)') from None
    return Prodigy


def _file_stem(t: _Table, key: str) -> str:
    value = t.text(key, nonempty=True).strip()
    if any(c in value for c in '/\\:*?"<>|') or value.startswith(".") or value.endswith(".safetensors"):
        raise t.fail(key, "a file name without folder or extension", value,
                      'use letters, digits, "_" or "-", e.g. "aligngen_s_star"')
    return value


def _dropout(t: _Table) -> DropoutConfig:
    rates = DropoutConfig(text=t.number("text", 0.0, 1.0), image=t.number("image", 0.0, 1.0),
                          both=t.number("both", 0.0, 1.0))
    total = rates.text + rates.image + rates.both
    if total > 1.0 + 1e-9:
        raise ConfigError(f"dropout.text + dropout.image + dropout.both: expected a sum <= 1 (they are shares of the "
                          f"same batch), got {total:g}; lower the rates")
    return rates


def _sample_subject(t: _Table, prompt: str, at: str) -> SampleSubject:
    label = t.text("label", nonempty=True).strip()
    if not label_in_caption(label, prompt):
        raise ConfigError(f'{t.where}.label: expected a word of {at}.prompt, got "{label}", which is not in the prompt '
                          f"as a whole word (case-insensitive); use the prompt's word for the subject")
    box_value, _ = t.raw("box")
    try:
        box = validate_box(box_value, f"{t.where}.box")
    except LayoutError as e:
        raise ConfigError(f"{e}; write box = [x0, y0, x1, y1] as fractions of the image") from None
    return SampleSubject(label=label, image=t.required_path("image"), box=box)


def _sample(t: _Table) -> SampleCase:
    prompt = t.text("prompt", nonempty=True)
    items, _ = t.raw("subjects")
    if not isinstance(items, (list, tuple)):
        raise t.fail("subjects", "[[sample.subjects]] tables", items)
    if len(items) > MAX_SUBJECTS:
        raise ConfigError(f"{t.where}.subjects: expected at most {MAX_SUBJECTS} subjects (the layout's limit), "
                          f"got {len(items)}; drop some")
    subjects = tuple(
        _sample_subject(_Table(f"{t.where}.subjects[{i}]", item, SampleSubject, t.base_dir, "[[sample.subjects]]"),
                        prompt, t.where)
        for i, item in enumerate(items))
    return SampleCase(prompt=prompt, width=t.integer("width", 8, multiple=8), height=t.integer("height", 8, multiple=8),
                      seed=t.integer("seed", 0), steps=t.integer("steps", 1), cfg=t.number("cfg", 0.0),
                      subjects=subjects)


# --------------------------------------------------------------------------- entry points


def parse_config(data: dict, base_dir: str | os.PathLike) -> Config:
    """Validate a config dict (a parsed TOML file, or ``Config.to_dict()``); relative paths start at base_dir."""
    base_dir = Path(base_dir)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table of sections, got {_show(data)}")
    known = [*_SECTIONS, "sample"]
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise ConfigError(f"{name}: unknown section; {hint}the sections are "
                              + ", ".join(f"[{s}]" for s in _SECTIONS) + " and [[sample]]")

    def table(name: str) -> _Table:
        return _Table(name, data.get(name, {}), _SECTIONS[name], base_dir, f"[{name}]")

    method = _method(table("method"))
    model, train = _model(table("model"), method.name), _train(table("train"))
    if method.flux:
        given = data.get("train", {}) if isinstance(data.get("train"), dict) else {}
        defaults = {"mosaic": MOSAIC_TRAIN_DEFAULTS, "aligngen": ALIGNGEN_TRAIN_DEFAULTS}.get(method.name,
                                                                                          DYNAIP_TRAIN_DEFAULTS)
        train = dataclasses.replace(train, **{k: v for k, v in defaults.items() if k not in given})
    if method.name in PREFERENCE_METHODS and not model.dino:
        raise ConfigError(f'model.dino: required when method.name is "{method.name}" (its focus map matches DINO '
                          "patches of each sample with the subject's reference); set it to a folder in models/dino or "
                          "a path")
    if method.name in PREFERENCE_METHODS and not method.init_adapter:
        kind = "a troupe-flux (DynaIP) file" if method.flux else "an MS-Diffusion or R^3 file"
        raise ConfigError(f"method.init_adapter: {method.name} tunes a trained adapter; name {kind} to start from "
                          "(a path or a name in models/ipadapter or models/troupe); it is also the frozen reference "
                          "model of the DPO loss")
    if method.name == "aligngen" and not (model.clip_vision and model.redux):
        raise ConfigError(f'model.{"redux" if model.clip_vision else "clip_vision"}: required when method.name is '
                          '"aligngen" (its DEM reads FLUX Redux tokens, Eq. 4 of AlignGen); set model.clip_vision to the '
                          'SigLIP encoder (sigclip_vision_patch14_384.safetensors) and model.redux to '
                          'flux1-redux-dev.safetensors (names in models/clip_vision and models/style_models, or paths)')
    if method.aligns and not model.dino:
        raise ConfigError(f'model.dino: required when method.name is "{method.name}" (its alignment loss compares '
                          f'UNet features with DINO features); set it to a folder in models/dino or a path, '
                          f'or use method.name = "ms-diffusion"')
    samples = data.get("sample", [])
    if isinstance(samples, dict):
        raise ConfigError("sample: expected [[sample]] tables (double brackets), got a single [sample] table; "
                          "write [[sample]]")
    if not isinstance(samples, (list, tuple)):
        raise ConfigError(f"sample: expected [[sample]] tables, got {_show(samples)}")
    if method.name in REFERENCE_METHODS and samples:
        raise ConfigError(f'sample: sample grids are not available for method.name "{method.name}" yet (the '
                          "fixed-batch loss in log.csv shows progress; dynaip and focusdpo-flux have them); remove "
                          "the [[sample]] tables")
    return Config(
        model=model, method=method, adapter=_adapter(table("adapter")), data=_data(table("data"), train.output_dir),
        train=train, dropout=_dropout(table("dropout")),
        samples=tuple(_sample(_Table(f"sample[{i}]", s, SampleCase, base_dir, "[[sample]]"))
                      for i, s in enumerate(samples)),
    )


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file; relative paths in it start at the file's folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; give the path of a .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_config(data, path.absolute().parent)
