"""Training runs on the tiny models (CPU): R^3 for 60 steps on 16 pasted MS-Bench records, resume, 2 processes,
phase 1, gradient checkpointing, MultiPersona-Align, and the command line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import COMFY_DIR
from fixtures.training import launch, pasted_dataset, tiny_components, tiny_config
from safetensors.torch import load_file

from comfyui_troupe.models.adapter_file import detect_and_load, read_state_dict
from comfyui_troupe.training.sdxl import OrthogonalProjection
from comfyui_troupe.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def families():
    from comfyui_troupe.nodes.adapter import families as f

    return f()


@pytest.fixture(scope="module")
def dataset(module_tmp, msbench) -> Path:
    """16 records, two subjects each (one reference file, one "crop from target"), and one shared feature cache."""
    work = module_tmp / "train"
    return pasted_dataset(work / "data", msbench)


def config_for(work: Path, dataset: Path, name: str = "r3", steps: int = 60, **sections):
    sections.setdefault("data", {})["cache_dir"] = str(dataset.parent.parent / "cache")
    return tiny_config(work, dataset, name, steps, **sections)


@pytest.fixture(scope="module")
def r3_run(dataset, module_tmp):
    """60 steps of R^3 (phase 1: 10 steps; alpha ramps over 10), batch 2, checkpoints at 30 and 60, one sample case."""
    work = module_tmp / "r3"
    refs = sorted((dataset.parent / "refs").glob("*_dog.png"))
    sample = {"prompt": "a dog and a teapot", "width": 64, "height": 64, "steps": 3, "cfg": 2.0,
              "subjects": [{"label": "dog", "image": str(refs[0]), "box": [0.05, 0.2, 0.45, 0.8]},
                           {"label": "teapot", "image": str(refs[0]), "box": [0.55, 0.1, 0.95, 0.6]}]}
    data = config_for(work, dataset, train={"sample_every": 60}).to_dict()
    data["sample"] = [sample]
    from comfyui_troupe.training.config import parse_config

    config = parse_config(data, work)
    components = tiny_components(work)
    result = train(config, components, show_bar=False)
    return config, components, result


def mean(rows, key, part):
    values = [r[key] for r in rows if key in r and r.get("diffusion") is not None and "loss" in r]
    chosen = values[:10] if part == "first" else values[-10:]
    return sum(chosen) / len(chosen)


def test_r3_run_lowers_the_loss_and_raises_the_alignment(r3_run):
    _, _, result = r3_run
    evals = [(r["step"], r["eval_diffusion"]) for r in result.log if "eval_diffusion" in r]
    assert [s for s, _ in evals] == [0, 30, 60]
    # the fixed batch (same records, noise, timesteps) at step 60 against step 0: the training lowered the loss
    assert evals[-1][1] < evals[0][1] - 0.005, evals
    # the per-step training loss draws a new timestep per sample: its first/last 10-step means are reported only
    print("training loss, first/last 10 steps:", mean(result.log, "diffusion", "first"),
          mean(result.log, "diffusion", "last"), "fixed batch:", evals)
    # alignment (Eqs. 8-9): cosine similarity of the aligned features with their projected DINO targets rises
    assert mean(result.log, "cos_cross", "last") > mean(result.log, "cos_cross", "first") + 0.3
    assert mean(result.log, "cos_self", "last") > mean(result.log, "cos_self", "first") + 0.05


def test_frozen_projection_is_unchanged_and_orthogonal_after_training(r3_run):
    config, _, result = r3_run
    trained = load_file(str(Path(result.checkpoint) / "model.safetensors"))  # what the engine saved at step 60
    fresh = OrthogonalProjection(64, widths=(128,), hidden=config.method.projection_width, seed=config.train.seed)
    for name, buf in fresh.named_buffers():
        assert torch.equal(trained[f"projection.{name}"], buf), name  # bit for bit: no gradient ever reached it
    w1, w2 = trained["projection.w1"].double(), trained["projection.w2_128"].double()
    assert torch.allclose(w1.T @ w1, torch.eye(64, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(w2.T @ w2, torch.eye(512, dtype=torch.float64), atol=1e-5) or \
        torch.allclose(w2 @ w2.T, torch.eye(128, dtype=torch.float64), atol=1e-5)


def test_the_saved_file_loads_as_an_r3_adapter(r3_run):
    _, _, result = r3_run
    adapter = detect_and_load(read_state_dict(str(result.adapter_path)), families())
    assert adapter.family == "sdxl" and adapter.format == "troupe-r3"
    assert float(adapter.module.refiner.alpha) == 1.0  # the ramp ended (A.1 of R^3-Adapter)
    mid = detect_and_load(read_state_dict(str(Path(result.checkpoint).parent / "checkpoint-0000030" /
                                               "adapter.safetensors")), families())
    assert mid.format == "troupe-r3"


def test_logs_curves_and_samples_are_written(r3_run):
    config, _, result = r3_run
    out = Path(config.train.output_dir)
    lines = (out / "log.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,diffusion") and len(lines) == 1 + 1 + 60  # header, step 0 (eval), 60 steps
    from PIL import Image

    with Image.open(result.curves) as im:
        assert im.size == (900, 760)
    assert result.last_samples == out / "samples" / "step-0000060.png"
    with Image.open(result.last_samples) as im:
        assert im.size[0] == 64 and im.size[1] > 64
    assert json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())["step"] == 60


def test_resume_from_step_30_reproduces_the_uninterrupted_run(r3_run, dataset, tmp_path):
    config, _, result = r3_run
    work = tmp_path / "resumed"
    (work / "run").mkdir(parents=True)
    shutil.copytree(Path(config.train.output_dir) / "checkpoint-0000030", work / "run" / "checkpoint-0000030")
    resumed = train(config_for(work, dataset, train={"resume": "latest"}), tiny_components(work), show_bar=False)
    assert resumed.steps == 60
    a, b = load_file(str(result.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_two_processes_match_one_process_with_the_same_global_batch(dataset, tmp_path):
    (tmp_path / "dino").parent.mkdir(exist_ok=True)
    tiny_components(tmp_path)  # the DINO folder both processes read, made before they start
    common = {"method": {"phase1_steps": 3, "ramp_steps": 3}}
    one = config_for(tmp_path, dataset, steps=10, train={"batch_size": 4, "output_dir": str(tmp_path / "one" / "run")},
                     **common)
    two = config_for(tmp_path, dataset, steps=10, train={"batch_size": 2, "output_dir": str(tmp_path / "two" / "run")},
                     **common)
    a = launch(tmp_path / "one", one, 1)
    b = launch(tmp_path / "two", two, 2)
    # gloo's all-reduce sums in another order than one process's batch mean: float-level differences, which Adam
    # (dividing by sqrt(v) + eps) turns into larger ones only for elements whose gradient is nearly zero. A real
    # difference in the data or the gradient moves every element by up to lr x steps = 1e-2 (measured: 1.8e-2 with
    # one process per batch half instead of DDP; 4e-8 mean and 1e-4 worst element with DDP).
    diffs = torch.cat([(a[k] - b[k]).abs().flatten().float() for k in a])
    assert float(diffs.mean()) < 1e-6, float(diffs.mean())
    assert float((diffs > 1e-5).float().mean()) < 1e-3  # fewer than 1 element in 1000
    assert float(diffs.max()) < 1e-3, float(diffs.max())


def test_phase_one_freezes_the_refiner_and_checkpointing_changes_nothing(dataset, tmp_path):
    from comfyui_troupe.training.sdxl import new_adapter

    runs = {}
    for gc in (False, True):
        work = tmp_path / f"gc{gc}"
        cfg = config_for(work, dataset, steps=3, train={"gradient_checkpointing": gc, "checkpoint_every": 3})
        runs[gc] = load_file(str(train(cfg, tiny_components(work), show_bar=False).adapter_path))
    for k in runs[False]:
        assert torch.allclose(runs[False][k], runs[True][k], atol=1e-6), k
    comps = tiny_components(tmp_path / "fresh")
    initial = new_adapter("r3", comps.base_model.diffusion_model, cfg.adapter, seed=cfg.train.seed)
    fresh = {k: v for k, v in initial.state_dict().items() if k.startswith("refiner.levels")}
    assert fresh
    moved = [k for k in fresh if not torch.equal(runs[False][k], fresh[k])]
    assert moved == []  # lr 0 through phase 1 (A.1): no update, no weight decay
    other = [k for k in runs[False] if k.startswith("ms_adapter.") and not torch.equal(runs[False][k],
                                                                                       initial.state_dict()[
                                                                                           "layers." + k[11:]])]
    assert other  # while the K/V projections did train


def test_multipersona_trains_its_projectors_and_saves_an_ms_diffusion_file(dataset, tmp_path):
    cfg = config_for(tmp_path, dataset, "multipersona", steps=4, method={"phase1_steps": 1},
                     train={"checkpoint_every": 4})
    result = train(cfg, tiny_components(tmp_path), show_bar=False)
    adapter = detect_and_load(read_state_dict(str(result.adapter_path)), families())
    assert adapter.format == "ms-diffusion"
    state = load_file(str(Path(result.checkpoint) / "model.safetensors"))
    heads = [k for k in state if k.startswith("projection.heads.")]
    assert heads and any("cross_128" in k for k in heads) and any("self_128" in k for k in heads)
    assert [r["align_weight"] for r in result.log if "loss" in r] == [0.0, 0.5, 0.5, 0.5]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(ROOT / "troupe_train.py"), "--comfyui", str(COMFY_DIR), *args],
                          check=False, capture_output=True, text=True, timeout=300)


def test_command_line_validates_manifests_and_refuses_bad_configs(dataset, tmp_path):
    ok = run_cli("validate", str(dataset))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "16 records" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    lines = dataset.read_text().splitlines()
    record = json.loads(lines[0])
    record["subjects"][0]["box"] = [0.5, 0.5, 0.5, 0.9]
    bad.write_text("\n".join([lines[1], json.dumps(record)]).replace('"images/', f'"{dataset.parent}/images/')
                   .replace('"refs/', f'"{dataset.parent}/refs/') + "\n")
    refused = run_cli("validate", str(bad))
    assert refused.returncode == 1 and "line 2" in refused.stdout, refused.stdout
    config = tmp_path / "run.toml"
    config.write_text('[model]\ncheckpoint = "x.safetensors"\nclip_vision = "y.safetensors"\n'
                      '[method]\nname = "ms-diffusion"\n[data]\nmanifest = "m.jsonl"\n'
                      '[train]\noutput_dir = "out"\nsteps = 10\nlearnig_rate = 1e-4\n')
    failed = run_cli("train", str(config))
    assert failed.returncode == 2
    assert "train.learnig_rate" in failed.stderr and "learning_rate" in failed.stderr, failed.stderr


def test_a_step_with_every_image_dropped_trains_on(dataset, tmp_path):
    """CFG dropout drops the image of a whole micro-batch on about 10% of steps at batch 1 (image 5% + both 5%):
    such a step backpropagates zero gradients instead of stopping the run."""
    config = config_for(tmp_path, dataset, "ms-diffusion", steps=2, dropout={"image": 1.0},
                        train={"checkpoint_every": 2})
    result = train(config, tiny_components(tmp_path), show_bar=False)
    assert result.steps == 2 and result.adapter_path.exists()

