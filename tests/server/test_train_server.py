"""TroupeTrainAdapter in the real ComfyUI server: a 10-step R^3 run on the tiny models and a pasted MS-Bench dataset,
then the new file loaded by TroupeLoadAdapter and sampled with TroupeApplySDXL; bad values refused at queue time.

The tiny SDXL takes SDXL's text context (2048) and pooled width (1280), so its CLIP is TroupeTestTinySDXLCLIP with
CLIP-L 768 + CLIP-G 1280 wide (the adapter's phrase width is derived from CLIP-L: 768); the tiny CLIP vision is 64
wide (the adapter's image width, derived too: extra_config gives only the other tiny sizes).
"""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import requests
from comfy_server import PromptError
from fixtures.tiny_models import tiny_hf_dinov2_folder
from fixtures.training import SIZE, TINY_ADAPTER, pasted_dataset
from fixtures.troupe_graphs import sdxl_graph
from PIL import Image

DINO = "tiny-dinov2-train"
NAME = "server_tiny_r3"
STEPS = 10


def toml_value(value) -> str:
    return "[" + ", ".join(str(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)


# the tiny sizes except the two widths the node derives from the connected CLIP vision and CLIP
EXTRA = ("[adapter]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in TINY_ADAPTER.items()
                                 if k not in ("image_width", "phrase_dim"))
         + "[method]\nphase1_steps = 3\nramp_steps = 3\n")


@pytest.fixture(scope="module")
def dataset(comfy_server, msbench, module_tmp) -> str:
    """The pasted MS-Bench dataset (folder with manifest.jsonl) and a tiny DINOv2 folder in models/dino."""
    tiny_hf_dinov2_folder(comfy_server.models_dir / "dino" / DINO, layers=2)
    return str(pasted_dataset(module_tmp / "train_data" / "data", msbench).parent)


def models_part() -> dict:
    return {
        "model": {"class_type": "TroupeTestTinySDXL", "inputs": {"seed": 0}},
        "clip": {"class_type": "TroupeTestTinySDXLCLIP", "inputs": {"width_l": 768, "width_g": 1280, "seed": 0}},
        "vae": {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "sdxl", "seed": 0}},
        "cv": {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 24, "seed": 0}},
    }


def train_prompt(dataset: str, **overrides) -> dict:
    """Tiny models -> TroupeTrainAdapter -> SaveImage of the loss plot and of the sample grid."""
    inputs = {"model": ["model", 0], "clip": ["clip", 0], "vae": ["vae", 0], "clip_vision": ["cv", 0],
              "dataset": dataset, "method": "r3", "dino_model": DINO, "init_adapter": "none", "output_name": NAME,
              "steps": STEPS, "batch_size": 2, "learning_rate": 1e-3, "resolution": SIZE, "seed": 0,
              "resume": False, "extra_config": EXTRA}
    inputs.update(overrides)
    p = models_part()
    p["train"] = {"class_type": "TroupeTrainAdapter", "inputs": inputs}
    p["plot"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 0], "filename_prefix": "train_plot"}}
    p["grid"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 1], "filename_prefix": "train_grid"}}
    return p


def base_prompt(cfg: float) -> dict:
    """The un-patched tiny SDXL (the very node the training graph uses) sampled and saved."""
    p = sdxl_graph()
    p.update(models_part())
    for key in ("apply", "ad", "enc", "cv", "clip"):
        p.pop(key, None)
    p["ks"]["inputs"].update(model=["model", 0], cfg=cfg)
    p["out"]["inputs"]["filename_prefix"] = "train_base"
    return p


def saved(comfy_server, entry: dict, node: str) -> np.ndarray:
    (image,) = entry["outputs"][node]["images"]
    return np.asarray(Image.open(comfy_server.image_path(image)).convert("RGB"), dtype=np.float32)


def test_node_schema(comfy_server):
    info = comfy_server.object_info()["TroupeTrainAdapter"]
    assert info["category"] == "Troupe/train" and info["output"] == ["IMAGE", "IMAGE", "STRING"]
    assert info["output_name"] == ["loss_plot", "samples", "adapter_name"]
    req = info["input"]["required"]
    assert req["method"][1]["options"] == ["r3", "ms-diffusion", "multipersona"] and req["method"][1]["default"] == "r3"
    assert req["output_name"][1]["default"] == "troupe_trained" and req["resolution"][1]["step"] == 64
    assert info["input"]["optional"]["extra_config"][1]["multiline"]


def test_train_then_sample_with_the_new_adapter(comfy_server, dataset, artifacts):
    """10 steps of R^3 (batch 2, 64 px): the loss plot is a real chart, the file lands in models/troupe, a second
    prompt loads it and samples with it, and the MODEL the training got is unchanged."""
    before = comfy_server.run(base_prompt(2.0))
    entry = comfy_server.run(train_prompt(dataset), timeout=600)
    text = entry["outputs"]["train"]["text"][0]
    assert text.startswith(f"r3: {STEPS} of {STEPS} steps") and "\nloss: " in text and "\nalign: " in text, text
    adapter = comfy_server.models_dir / "troupe" / f"{NAME}.safetensors"  # the troupe folder the server was given
    assert f"adapter: {adapter} (pick it in TroupeLoadAdapter)" in text and adapter.is_file(), text
    run_dir = comfy_server.output_dir / "troupe_training" / NAME
    assert (run_dir / "log.csv").read_text().splitlines()[-1].startswith(f"{STEPS},")  # a row per step, the last

    plot = saved(comfy_server, entry, "plot")
    shutil.copy(comfy_server.image_path(entry["outputs"]["plot"]["images"][0]), artifacts / "train_server_loss_plot.png")
    assert plot.shape[0] >= 200 and plot.shape[1] >= 300, plot.shape  # the curves chart, not a placeholder card
    assert (plot < 128).any(axis=-1).mean() > 0.005  # axes, text and curves drawn on it
    grid = saved(comfy_server, entry, "grid")
    shutil.copy(comfy_server.image_path(entry["outputs"]["grid"]["images"][0]), artifacts / "train_server_samples.png")
    assert grid.shape[1] >= SIZE and grid.std() > 1  # the sample of the first record under its step header

    p = sdxl_graph(seed=3)
    p.update(models_part())
    p["ad"] = {"class_type": "TroupeLoadAdapter", "inputs": {"adapter_name": f"{NAME}.safetensors"}}
    p["out"]["inputs"]["filename_prefix"] = "train_applied"
    applied = comfy_server.run(p)
    assert "troupe-r3" in applied["outputs"]["ad"]["text"][0]
    assert saved(comfy_server, applied, "out").shape == (SIZE, SIZE, 3)

    after = comfy_server.run(base_prompt(2.0001))  # cfg differs in the 4th decimal only to defeat the cache
    assert np.abs(saved(comfy_server, after, "out") - saved(comfy_server, before, "out")).max() <= 2


def test_a_second_fresh_run_into_the_same_folder_is_refused(comfy_server, dataset):
    """A run folder that holds a checkpoint (as a finished or cancelled run leaves it): a fresh run there is refused
    before any training."""
    name = "server_taken"
    checkpoint = comfy_server.output_dir / "troupe_training" / name / "checkpoint-0000003"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')
    with pytest.raises(PromptError) as e:
        comfy_server.run(train_prompt(dataset, output_name=name, steps=STEPS + 1))
    assert "TroupeTrainAdapter: input 'resume': the run folder" in str(e.value)
    assert not (comfy_server.models_dir / "troupe" / f"{name}.safetensors").exists()


def test_cancel_saves_a_checkpoint_and_resume_continues_it(comfy_server, dataset):
    """Cancel in the middle of a run: ComfyUI's ops stop the step in progress, the node saves a resumable checkpoint
    and says where; queued again with resume on, the run continues from that step to the end."""
    name = "server_cancel"
    run_dir = comfy_server.output_dir / "troupe_training" / name
    extra = EXTRA + "[train]\ncheckpoint_every = 2\n"
    prompt_id = comfy_server.queue(train_prompt(dataset, output_name=name, steps=500, extra_config=extra))
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoint-*/trainer_state.json")):  # training has begun: its first checkpoint
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    requests.post(f"{comfy_server.url}/interrupt", timeout=10)
    with pytest.raises(PromptError) as e:
        comfy_server.wait(prompt_id)
    assert any(m[0] == "execution_interrupted" for m in e.value.payload["status"]["messages"])
    assert "training cancelled; the resumable checkpoint is" in comfy_server.log()
    done = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert 2 <= done < 500

    entry = comfy_server.run(train_prompt(dataset, output_name=name, steps=done + 2, resume=True, extra_config=extra))
    assert entry["outputs"]["train"]["text"][0].startswith(f"r3: {done + 2} of {done + 2} steps")
    steps = [int(float(r.split(",")[0])) for r in (run_dir / "log.csv").read_text().splitlines()[1:]]
    assert steps[-1] == done + 2 and 1 in steps  # the rows before the cancel kept


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"dataset": "/no/such/troupe/dataset"}, "TroupeTrainAdapter: input 'dataset': no folder or file"),
    ({"dino_model": "none"}, "TroupeTrainAdapter: input 'dino_model': 'none', but method r3 has an alignment loss"),
    ({"output_name": "../escape"}, "TroupeTrainAdapter: input 'output_name': expected a plain file name"),
])
def test_bad_values_are_refused_at_queue_time(comfy_server, dataset, overrides, expected):
    with pytest.raises(PromptError) as e:
        comfy_server.queue(train_prompt(**{"dataset": dataset, "output_name": "server_refused", **overrides}))
    assert expected in str(e.value)
    assert "Custom validation failed" in str(e.value)  # /prompt refused it: nothing ran


def test_a_bad_extra_config_key_names_the_input(comfy_server, dataset):
    """A ConfigError (here an unknown [adapter] key) is the node's error on input 'extra_config', before training."""
    with pytest.raises(PromptError) as e:
        comfy_server.run(train_prompt(dataset, output_name="server_bad_extra", extra_config="[adapter]\ntokenz = 4\n"))
    assert "TroupeTrainAdapter: input 'extra_config': adapter.tokenz: unknown key" in str(e.value)
    assert not (comfy_server.models_dir / "troupe" / "server_bad_extra.safetensors").exists()
