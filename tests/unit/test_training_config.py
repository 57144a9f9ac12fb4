"""training.config: a TOML file validated into frozen dataclasses; every bad value raises naming its dotted key."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from comfyui_troupe.training.config import (
    METHODS,
    Config,
    ConfigError,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[model]
checkpoint = "sd_xl_base_1.0.safetensors"
clip_vision = "CLIP-ViT-bigG-14.safetensors"
dino = "dinov2-base"

[method]
name = "r3"

[data]
manifest = "data/manifest.jsonl"

[train]
output_dir = "runs/r3"
steps = 100

[[sample]]
prompt = "a Dog and a teapot on a table"

[[sample.subjects]]
label = "dog"
image = "refs/dog.jpg"
box = [0.05, 0.3, 0.45, 0.95]

[[sample.subjects]]
label = "teapot"
image = "/abs/teapot.png"
box = [0.5, 0.4, 0.9, 0.9]
"""


def _toml_to_dict(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


@pytest.fixture
def base() -> dict:
    return _toml_to_dict(MINIMAL)


def _error(data: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    return str(info.value)


# --------------------------------------------------------------------------- a valid file


def test_minimal_file_gets_the_documented_defaults(tmp_path):
    path = tmp_path / "cfg" / "train.toml"
    path.parent.mkdir()
    path.write_text(MINIMAL)
    cfg = load_config(path)
    folder = path.parent
    assert isinstance(cfg, Config) and {"r3", "ms-diffusion", "multipersona", "dynaip", "mosaic"} <= set(METHODS)
    # model names stay as written: the trainer looks them up in ComfyUI's model folders
    assert cfg.model.checkpoint == "sd_xl_base_1.0.safetensors"
    assert cfg.model.clip_vision == "CLIP-ViT-bigG-14.safetensors" and cfg.model.dino == "dinov2-base"
    assert cfg.model.comfyui is None and cfg.method.init_adapter == ""
    m = cfg.method
    assert (m.name, m.align_weight, m.align_blocks, m.phase1_steps, m.ramp_steps, m.projection_width,
            m.projector_dropout) == ("r3", 0.01, "down+mid", 1000, 1000, 512, 0.1)
    assert m.aligns
    a = cfg.adapter
    assert (a.tokens, a.resampler_dim, a.resampler_depth, a.resampler_heads, a.resampler_dim_head, a.ff_mult,
            a.image_width, a.phrase_dim, a.dummy_tokens, a.refiner_heads, a.refiner_window, a.refiner_topk) == (
        16, 1280, 4, 20, 64, 4, 1664, 768, 4, 32, 4, (8, 4))
    # relative paths start at the config's folder, not the working directory
    assert cfg.data.manifest == folder / "data" / "manifest.jsonl"
    assert cfg.train.output_dir == folder / "runs" / "r3"
    assert cfg.data.cache_dir == folder / "runs" / "r3" / "cache"
    assert (cfg.data.resolution, cfg.data.dino_resolution) == (1024, 224)
    t = cfg.train
    assert (t.steps, t.batch_size, t.grad_accum, t.learning_rate, t.lr_schedule, t.warmup_steps, t.weight_decay,
            t.max_grad_norm, t.precision, t.gradient_checkpointing, t.seed, t.checkpoint_every, t.sample_every,
            t.keep_checkpoints, t.resume, t.tensorboard) == (
        100, 1, 1, 1e-4, "constant", 0, 0.01, 1.0, "bf16", False, 0, 500, 500, 3, "", False)
    assert (cfg.dropout.text, cfg.dropout.image, cfg.dropout.both) == (0.05, 0.05, 0.05)
    (sample,) = cfg.samples
    assert (sample.width, sample.height, sample.seed, sample.steps, sample.cfg) == (1024, 1024, 0, 20, 5.0)
    dog, teapot = sample.subjects
    assert dog.label == "dog" and dog.image == folder / "refs" / "dog.jpg" and dog.box == (0.05, 0.3, 0.45, 0.95)
    assert teapot.image == Path("/abs/teapot.png")  # absolute paths are kept


def test_every_key_set_explicitly(base, tmp_path):
    base["model"]["comfyui"] = "../ComfyUI"
    base["method"].update(init_adapter="ms_adapter.bin", align_weight=0, align_blocks="mid", phase1_steps=0,
                          ramp_steps=10, projection_width=256, projector_dropout=0.0)
    base["adapter"] = {"tokens": 8, "refiner_topk": [4, 2], "image_width": 1280}
    base["data"].update(resolution=512, cache_dir="/cache", dino_resolution=518)
    base["train"].update(batch_size=2, grad_accum=4, learning_rate=1, lr_schedule="cosine", warmup_steps=50,
                         weight_decay=0, max_grad_norm=0, precision="fp32", gradient_checkpointing=True, seed=7,
                         checkpoint_every=10, sample_every=0, keep_checkpoints=1, resume="runs/r3/step_10",
                         tensorboard=True)
    base["dropout"] = {"text": 0.1, "image": 0.1, "both": 0.8}  # sums to exactly 1: allowed
    cfg = parse_config(base, tmp_path)
    assert cfg.model.comfyui == tmp_path / ".." / "ComfyUI"
    assert cfg.method.init_adapter == "ms_adapter.bin"  # a model name: not resolved
    assert cfg.method.align_weight == 0.0 and isinstance(cfg.method.align_weight, float)  # ints accepted as floats
    assert cfg.adapter.refiner_topk == (4, 2) and cfg.adapter.tokens == 8 and cfg.adapter.resampler_dim == 1280
    assert cfg.data.cache_dir == Path("/cache")
    assert cfg.train.learning_rate == 1.0 and cfg.train.resume == str(tmp_path / "runs" / "r3" / "step_10")
    assert cfg.dropout.both == 0.8


def test_resume_latest_is_kept(base, tmp_path):
    base["train"]["resume"] = "latest"
    assert parse_config(base, tmp_path).train.resume == "latest"


def test_ms_diffusion_needs_no_dino(base, tmp_path):
    del base["model"]["dino"]
    base["method"]["name"] = "ms-diffusion"
    cfg = parse_config(base, tmp_path)
    assert cfg.model.dino == "" and not cfg.method.aligns


def test_no_samples_is_allowed(base, tmp_path):
    del base["sample"]
    assert parse_config(base, tmp_path).samples == ()


def test_to_dict_round_trips_through_json(base, tmp_path):
    base["train"]["resume"] = "ckpt"
    cfg = parse_config(base, tmp_path)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert set(saved) == {"model", "method", "adapter", "data", "train", "dropout", "sample"}
    assert saved["data"]["manifest"] == str(tmp_path / "data" / "manifest.jsonl") and saved["model"]["comfyui"] == ""
    # all paths are absolute, so the saved copy reads back identically from any folder
    assert parse_config(saved, tmp_path / "elsewhere") == cfg


def test_docs_example_config_parses(tmp_path):
    # the full, commented example in docs/training-data.md must stay a valid config
    text = (ROOT / "docs" / "training-data.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "docs/training-data.md has no ```toml block"
    cfg = parse_config(_toml_to_dict(blocks[0]), tmp_path)
    assert cfg.samples and cfg.method.name in METHODS


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "steps", -3, "train.steps: expected a positive integer, got -3"),
    ("train", "steps", 0, "train.steps: expected a positive integer, got 0"),
    ("train", "steps", True, "train.steps: expected a positive integer, got true"),  # bool is not an int
    ("train", "steps", 2.5, "train.steps: expected a positive integer, got 2.5"),
    ("train", "steps", "100", 'train.steps: expected a positive integer, got "100"'),
    ("train", "seed", False, "train.seed: expected a non-negative integer, got false"),
    ("train", "warmup_steps", -1, "train.warmup_steps: expected a non-negative integer"),
    ("train", "learning_rate", 0, "train.learning_rate: expected a number > 0, got 0"),
    ("train", "learning_rate", True, "train.learning_rate: expected a number > 0, got true"),
    ("train", "max_grad_norm", -1.0, "train.max_grad_norm: expected a number >= 0"),
    ("train", "precision", "fp8", 'train.precision: expected one of "fp32", "bf16", "fp16", got "fp8"'),
    ("train", "lr_schedule", "cosin", 'did you mean "cosine"?'),
    ("train", "gradient_checkpointing", 1, "train.gradient_checkpointing: expected true or false, got 1"),
    ("train", "sample_every", -5, "train.sample_every: expected a non-negative integer"),
    ("train", "output_dir", "", "train.output_dir: expected a path"),
    ("data", "resolution", 1000, "data.resolution: expected an integer >= 64 that is a multiple of 64, got 1000"),
    ("data", "resolution", 0, "data.resolution: expected an integer >= 64"),
    ("data", "manifest", 3, "data.manifest: expected a string, got 3"),
    ("method", "name", "ms-difusion", 'method.name: expected one of "r3", "ms-diffusion", "multipersona"'),
    ("method", "align_blocks", "up", 'method.align_blocks: expected one of "down+mid", "down", "mid", got "up"'),
    ("method", "projector_dropout", 1.0, "method.projector_dropout: expected a number in [0, 1), got 1.0"),
    ("method", "align_weight", -0.1, "method.align_weight: expected a number >= 0"),
    ("method", "projection_width", 0, "method.projection_width: expected a positive integer"),
    ("adapter", "tokens", 0, "adapter.tokens: expected a positive integer, got 0"),
    ("adapter", "refiner_topk", [8], "adapter.refiner_topk: expected a list of 2 positive integers"),
    ("adapter", "refiner_topk", [8, 0], "adapter.refiner_topk: expected a list of 2 positive integers"),
    ("dropout", "text", 1.5, "dropout.text: expected a number in [0, 1], got 1.5"),
    ("model", "checkpoint", "", 'model.checkpoint: expected a non-empty string, got ""'),
])
def test_bad_value_names_its_key(base, tmp_path, section, key, value, expected):
    base.setdefault(section, {})[key] = value
    assert expected in _error(base, tmp_path)


def test_unknown_key_suggests_and_lists_the_known_keys(base, tmp_path):
    base["train"]["setps"] = 10
    message = _error(base, tmp_path)
    assert message.startswith("train.setps: unknown key")
    assert 'did you mean "steps"?' in message
    assert "batch_size" in message and "tensorboard" in message  # the section's known keys


def test_unknown_key_without_close_match_lists_keys(base, tmp_path):
    base["dropout"] = {"zzzz": 0.1}
    message = _error(base, tmp_path)
    assert message.startswith("dropout.zzzz: unknown key") and "did you mean" not in message
    assert "both, image, text" in message


def test_unknown_section(base, tmp_path):
    base["trian"] = {"steps": 1}
    message = _error(base, tmp_path)
    assert message.startswith("trian: unknown section") and "did you mean [train]?" in message


def test_section_that_is_not_a_table(base, tmp_path):
    base["dropout"] = 0.1
    assert _error(base, tmp_path).startswith("dropout: expected a table ([dropout]), got 0.1")


def test_single_bracket_sample_table(base, tmp_path):
    base["sample"] = {"prompt": "a dog"}
    assert "write [[sample]]" in _error(base, tmp_path)


@pytest.mark.parametrize("section, key", [
    ("model", "checkpoint"), ("model", "clip_vision"), ("method", "name"), ("data", "manifest"),
    ("train", "output_dir"), ("train", "steps"),
])
def test_missing_required_key(base, tmp_path, section, key):
    del base[section][key]
    message = _error(base, tmp_path)
    assert message.startswith(f"{section}.{key}: required key is missing; add it under [{section}], e.g. {key} = ")


def test_missing_required_section(base, tmp_path):
    del base["train"]
    assert _error(base, tmp_path).startswith("train.output_dir: required key is missing")


def test_dropout_sum_over_one(base, tmp_path):
    base["dropout"] = {"text": 0.5, "image": 0.5, "both": 0.1}
    message = _error(base, tmp_path)
    assert message.startswith("dropout.text + dropout.image + dropout.both: expected a sum <= 1") and "1.1" in message


@pytest.mark.parametrize("method", ["r3", "multipersona"])
def test_aligning_method_needs_dino(base, tmp_path, method):
    base["method"]["name"] = method
    base["model"]["dino"] = ""
    message = _error(base, tmp_path)
    assert message.startswith(f'model.dino: required when method.name is "{method}"')


def test_sample_label_not_in_prompt(base, tmp_path):
    base["sample"][0]["subjects"][1]["label"] = "teapots"  # "teapot" is in the prompt, "teapots" is not
    message = _error(base, tmp_path)
    assert message.startswith("sample[0].subjects[1].label:") and '"teapots"' in message


def test_sample_label_is_a_whole_word_case_insensitive(base, tmp_path):
    base["sample"][0]["subjects"][0]["label"] = "DOG"  # the prompt says "Dog"
    assert parse_config(base, tmp_path).samples[0].subjects[0].label == "DOG"
    base["sample"][0]["subjects"][0]["label"] = "do"  # a part of a word does not count
    assert _error(base, tmp_path).startswith("sample[0].subjects[0].label:")


@pytest.mark.parametrize("box, expected", [
    ([0.5, 0.1, 0.4, 0.9], "zero or negative area"),
    ([0.1, 0.1, 0.1, 0.9], "zero or negative area"),
    ([0.1, 0.1, 1.2, 0.9], "x1=1.2 is out of range"),
    ([0.1, 0.1, 0.9], "expected 4 numbers"),
    ([0.1, True, 0.5, 0.9], "y0 must be a finite number"),
])
def test_sample_bad_box(base, tmp_path, box, expected):
    base["sample"][0]["subjects"][0]["box"] = box
    message = _error(base, tmp_path)
    assert message.startswith("sample[0].subjects[0].box:") and expected in message


def test_more_than_eight_sample_subjects(base, tmp_path):
    subject = base["sample"][0]["subjects"][0]
    base["sample"][0]["subjects"] = [copy.deepcopy(subject) for _ in range(9)]
    assert _error(base, tmp_path).startswith("sample[0].subjects: expected at most 8 subjects")
    base["sample"][0]["subjects"] = base["sample"][0]["subjects"][:8]
    assert len(parse_config(base, tmp_path).samples[0].subjects) == 8


@pytest.mark.parametrize("key, value, expected", [
    ("width", 1020, "sample[0].width: expected an integer >= 8 that is a multiple of 8, got 1020"),
    ("steps", 0, "sample[0].steps: expected a positive integer"),
    ("prompt", "", "sample[0].prompt: expected a non-empty string"),
    ("promt", "x", 'sample[0].promt: unknown key; did you mean "prompt"?'),
])
def test_sample_bad_values(base, tmp_path, key, value, expected):
    base["sample"][0][key] = value
    assert expected in _error(base, tmp_path)


def test_sample_subject_unknown_key(base, tmp_path):
    base["sample"][0]["subjects"][0]["images"] = "x.jpg"
    message = _error(base, tmp_path)
    assert message.startswith('sample[0].subjects[0].images: unknown key; did you mean "image"?')


def test_load_config_reports_toml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_config_is_frozen(base, tmp_path):
    cfg = parse_config(base, tmp_path)
    with pytest.raises(AttributeError):
        cfg.train.steps = 5


# --------------------------------------------------------------------------- dynaip (FLUX)


def _dynaip(base: dict) -> dict:
    data = dict(base)
    data["model"] = {"unet": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors", "t5": "t5xxl_fp16.safetensors",
                     "vae": "ae.safetensors", "clip_vision": "open_clip_vit_l_14_336.safetensors"}
    data["method"] = {"name": "dynaip"}
    data.pop("sample")
    return data


def test_dynaip_gets_dynaip_defaults_and_keeps_written_values(base, tmp_path):
    """DynaIP "Implementation Details": AdamW, cosine from 2e-5, weight decay 1e-4, 20,000 intra steps, 5% expert
    dropout; the SDXL methods keep IP-Adapter's optimiser defaults; a written value always wins."""
    cfg = parse_config(_dynaip(base), tmp_path)
    assert cfg.method.flux and not cfg.method.aligns and cfg.model.checkpoint == ""
    assert (cfg.model.unet, cfg.model.clip_l, cfg.model.t5, cfg.model.vae) == (
        "flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors")
    t = cfg.train
    assert (t.learning_rate, t.lr_schedule, t.weight_decay) == (2e-5, "cosine", 1e-4)
    assert (cfg.method.stage1_steps, cfg.method.expert_dropout) == (20000, 0.05)
    assert (cfg.adapter.fusion_width, cfg.adapter.router_hidden) == (0, 256)
    data = _dynaip(base)
    data["train"] = dict(data["train"], learning_rate=1e-4, lr_schedule="constant")
    data["method"] = {"name": "dynaip", "stage1_steps": 5, "expert_dropout": 0.1}
    data["adapter"] = {"fusion_width": 3072, "router_hidden": 64}
    cfg = parse_config(data, tmp_path)
    assert (cfg.train.learning_rate, cfg.train.lr_schedule, cfg.train.weight_decay) == (1e-4, "constant", 1e-4)
    assert (cfg.method.stage1_steps, cfg.method.expert_dropout, cfg.adapter.fusion_width) == (5, 0.1, 3072)
    assert parse_config(json.loads(json.dumps(cfg.to_dict())), tmp_path) == cfg
    sdxl = parse_config(base, tmp_path).train
    assert (sdxl.learning_rate, sdxl.lr_schedule, sdxl.weight_decay) == (1e-4, "constant", 0.01)


@pytest.mark.parametrize("key", ["unet", "clip_l", "t5", "vae", "clip_vision"])
def test_dynaip_needs_the_flux_files(base, tmp_path, key):
    data = _dynaip(base)
    del data["model"][key]
    message = _error(data, tmp_path)
    assert message.startswith(f"model.{key}: required key is missing"), message
    assert f"add it under [model], e.g. {key} = " in message


@pytest.mark.parametrize("section, key, value, expected", [
    ("method", "expert_dropout", 1.0, "method.expert_dropout: expected a number in [0, 1)"),
    ("method", "stage1_steps", -1, "method.stage1_steps: expected a non-negative integer, got -1"),
    ("adapter", "fusion_width", -1, "adapter.fusion_width: expected a non-negative integer, got -1"),
])
def test_dynaip_bad_values_name_the_key(base, tmp_path, section, key, value, expected):
    data = _dynaip(base)
    data[section] = dict(data.get(section, {}), **{key: value})
    message = _error(data, tmp_path)
    assert message.startswith(expected), message


def test_gradient_checkpointing_is_accepted_by_every_flux_method(base, tmp_path):
    """DynaIP's blocks are checkpointed with their image term (training/flux.py), the reference methods' joint
    blocks with the reference stream (training/reference.py)."""
    data = _dynaip(base)
    data["train"] = dict(data.get("train", {}), gradient_checkpointing=True)
    for name in ("dynaip", "mosaic"):
        data["method"] = {"name": name}
        assert parse_config(data, tmp_path).train.gradient_checkpointing, name


def test_sample_cases_are_refused_for_the_reference_methods_only(base, tmp_path):
    data = _dynaip(base)
    data["sample"] = base["sample"]
    assert len(parse_config(data, tmp_path).samples) == len(base["sample"])  # dynaip renders them (training/samples.py)
    data["method"] = {"name": "mosaic"}
    assert _error(data, tmp_path).startswith('sample: sample grids are not available for method.name "mosaic"')
