"""The benchmark runner against the real server: a 4-case MS-Bench spec x 2 settings on the tiny SDXL, scored by
TroupeFidelity in the graph, killed midway and resumed, CSV, comparisons and HTML report written."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from fixtures.sdxl_adapters import ms_diffusion_state_dict, write_adapter

from comfyui_troupe.evaluation.bench.generators import msbench_spec
from comfyui_troupe.evaluation.bench.results import columns

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).resolve().parent / "bench" / "tiny_sdxl_template.json"
SIZE = 128
SETTINGS = {"adapter on": {}, "adapter off": {"16.model": ["1", 0]}}
POLL_S, KILL_DEADLINE_S, RUN_TIMEOUT_S = 0.2, 240, 600


@pytest.fixture(scope="module")
def adapter(comfy_server) -> str:
    """An MS-Diffusion-layout file whose phrase width is the tiny CLIP's clip_l (48, also CLIP-T's text tower)."""
    write_adapter(comfy_server.models_dir / "troupe" / "bench_ms_diffusion.safetensors",
                  ms_diffusion_state_dict(11, phrase_dim=48))
    return "bench_ms_diffusion.safetensors"


def write_spec(folder: Path, combinations: str = "living_object,object_object", per: int = 1, prompts: int = 2) -> Path:
    """The MS-Bench generator's spec (4 cases by default), on the tiny template at 128 px, adapter on / off."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    spec = msbench_spec(Namespace(combinations=combinations, per_combination=per, prompts=prompts, sample_seed=3,
                                  spec=path))
    spec.update(workflow=str(TEMPLATE), width=SIZE, height=SIZE, seeds=[0], settings=SETTINGS,
                compare=[["adapter off", "adapter on"]])
    path.write_text(json.dumps(spec, indent=1))
    return path


def bench(spec: Path, out: Path, server) -> subprocess.Popen:
    """``python -m evaluation.bench run`` from the pack's folder, as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "evaluation.bench", "run", str(spec), "--out", str(out),
                             "--server", server.url], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def data_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("scores")]


def test_four_cases_run_resume_after_a_kill_and_report(comfy_server, adapter, tmp_path):
    spec = write_spec(tmp_path / "spec")
    out = tmp_path / "out"
    results = out / "results.csv"
    first = bench(spec, out, comfy_server)
    deadline = time.monotonic() + KILL_DEADLINE_S
    while len(data_rows(results)) < 2:  # kill once two runs are in the CSV: midway through the 8
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "no run finished in time"
        time.sleep(POLL_S)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = data_rows(results)
    assert 2 <= len(before) < 8, len(before)
    assert not (out / "report.html").exists()  # killed before the end

    second = bench(spec, out, comfy_server)
    stdout, stderr = second.communicate(timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, stderr[-3000:]
    assert f"{8 - len(before)} runs finished, {len(before)} skipped (already done), 0 failed" in stdout
    assert f"resuming {out}: {len(before)} of 8 runs already in results.csv, skipped" in stderr
    assert "case object_object/" in stderr and "8/8" in stderr  # the progress bar over cases reached the end

    rows = data_rows(results)
    assert len(rows) == 8
    assert len({(r["case"], r["seed"], r["setting"]) for r in rows}) == 8
    assert {r["setting"] for r in rows} == set(SETTINGS) and len({r["case"] for r in rows}) == 4
    with results.open(newline="") as f:
        assert next(csv.reader(f)) == columns(2)
    for r in rows:  # every column filled (two subjects each, CLIP-I, CLIP-T and DINO measured)
        assert all(r[c] != "" for c in columns(2)), {c: r[c] for c in columns(2) if r[c] == ""}
        for k in (1, 2):
            assert -1 <= float(r[f"s{k}_clip_i"]) <= 1 and -1 <= float(r[f"s{k}_dino"]) <= 1
            assert float(r[f"s{k}_clip_i_margin"]) == pytest.approx(
                float(r[f"s{k}_clip_i"]) - float(r[f"s{k}_clip_i_leak"]), abs=2e-6)
        scores = json.loads((out / r["scores"]).read_text())
        assert scores["prompt"] == r["prompt"] and float(r["clip_t"]) == pytest.approx(scores["clip_t"], abs=1e-6)
        assert (out / r["image"]).stat().st_size > 0 and (out / r["heatmap"]).stat().st_size > 0
    # the runs finished before the kill were skipped, not run again
    first_ids = {(r["case"], r["setting"]): r["prompt_id"] for r in before}
    assert all(first_ids[(r["case"], r["setting"])] == r["prompt_id"] for r in rows if (r["case"], r["setting"])
               in first_ids)
    # the setting reached the graph: adapter on and off give different images of the same case and seed
    by = {(r["case"], r["setting"]): (out / r["image"]).read_bytes() for r in rows}
    assert all(by[(c, "adapter on")] != by[(c, "adapter off")] for c in {r["case"] for r in rows})

    with (out / "comparisons.csv").open(newline="") as f:
        comp = list(csv.DictReader(f))
    assert [c["metric"] for c in comp] == ["clip_t", "clip_i_mean", "clip_i_margin_mean", "dino_mean",
                                           "dino_margin_mean"]
    assert all(c["baseline"] == "adapter off" and c["setting"] == "adapter on" and c["n"] == "4" for c in comp)
    assert all(float(c["ci95_low"]) <= float(c["mean_diff"]) <= float(c["ci95_high"]) for c in comp)
    report = (out / "report.html").read_text()
    assert report.count("<img class=output") == 8 and report.count("<img class=heatmap") == 8
    assert "<table class=comparison" in report and "src='data:image/png;base64," in report  # self-contained

    third = bench(spec, out, comfy_server)  # nothing left: everything skipped, the report rebuilt
    stdout, _ = third.communicate(timeout=RUN_TIMEOUT_S)
    assert third.returncode == 0 and "0 runs finished, 8 skipped" in stdout


def test_refused_and_failing_runs_are_logged_and_retried_later(comfy_server, adapter, tmp_path):
    """A setting the server refuses at queue time and one that fails while running: both logged, no CSV row, so a
    later run tries them again; the runner exits 1. A spec without a workflow stops before anything runs (exit 2)."""
    spec = write_spec(tmp_path / "spec", combinations="living_object", prompts=1)
    raw = json.loads(spec.read_text())
    raw["settings"] = {"refused": {"12.blocks": "nonsense"},
                       "fails": {"12.routing": "manual", "12.schedule": ""}}
    del raw["compare"]
    spec.write_text(json.dumps(raw))
    proc = bench(spec, tmp_path / "out", comfy_server)
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 1 and "0 runs finished, 0 skipped (already done), 2 failed" in stdout, stderr
    log = (tmp_path / "out" / "errors.log").read_text().splitlines()
    assert len(log) == 2 and all(line.startswith("living_object/") for line in log)
    assert "| refused | seed 0: the server refused the workflow" in log[0]
    assert "TroupeApplySDXL: input 'blocks': expected one of" in log[0]
    assert "| fails | seed 0: the prompt failed: TroupeApplySDXL: TroupeApplySDXL: input 'schedule': routing is " \
           "'manual' but the schedule is empty" in log[1]
    assert data_rows(tmp_path / "out" / "results.csv") == []  # a failed run leaves no row: a rerun retries it
    assert (tmp_path / "out" / "report.html").exists()  # the report is written anyway ("not run yet" cells)

    del raw["workflow"]
    spec.write_text(json.dumps(raw))
    proc = bench(spec, tmp_path / "out2", comfy_server)
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2 and "error: workflow: give the path of an API-format workflow" in stderr


def test_shipped_templates_name_nodes_and_inputs_the_server_has(comfy_server):
    """benchmarks/templates/*.json cannot run here (no real weights), but every node type and input must exist."""
    info = comfy_server.object_info()
    templates = sorted((ROOT / "benchmarks" / "templates").glob("*.json"))
    assert templates
    for path in templates:
        graph = json.loads(path.read_text())
        for nid, node in graph.items():
            assert node["class_type"] in info, (path.name, nid, node["class_type"])
            spec = info[node["class_type"]]["input"]
            names = {*spec.get("required", {}), *spec.get("optional", {})}
            unknown = set(node["inputs"]) - names
            assert not unknown, (path.name, nid, unknown)


def test_a_run_with_three_seeds_gives_focusdpo_pairs(comfy_server, adapter, tmp_path):
    """K = 3 samples of one case through the server, scored in the graph, then ``python -m evaluation.bench pairs``:
    a training manifest whose winner has the higher reward, recomputed here from results.csv."""
    from comfyui_troupe.training.manifest import read_manifest, validate_manifest

    path = write_spec(tmp_path / "spec", combinations="living_object", per=1, prompts=1)
    spec = json.loads(path.read_text())
    spec.update(seeds=[0, 1, 2], settings={"adapter on": {}}, compare=[])
    path.write_text(json.dumps(spec, indent=1))
    out = tmp_path / "out"
    stdout, stderr = bench(path, out, comfy_server).communicate(timeout=RUN_TIMEOUT_S)
    assert "3 runs finished" in stdout, stderr[-3000:]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "evaluation.bench", "pairs", str(path), "--out", str(out),
                           "--weights", "dino_mean=1,clip_i_mean=1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "1 preference pairs" in done.stdout
    manifest = out / "pairs.jsonl"
    assert validate_manifest(manifest).ok
    (record,) = read_manifest(manifest)
    rewards = {r["image"]: float(r["dino_mean"]) + float(r["clip_i_mean"]) for r in data_rows(out / "results.csv")}
    winner, loser = record.image.relative_to(out).as_posix(), record.loser.relative_to(out).as_posix()
    assert rewards[winner] == max(rewards.values()) and rewards[loser] == min(rewards.values())
    assert record.scores == pytest.approx((rewards[winner], rewards[loser]), abs=1e-6)
