"""FocusDPO preference pairs from a benchmark run (evaluation/bench/pairs.py): rewards by hand, pairing modes, and
the written pairs.jsonl passing the training manifest's validator."""
from __future__ import annotations

import csv
import json
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

from comfyui_troupe.evaluation.bench.generators import msbench_spec
from comfyui_troupe.evaluation.bench.pairs import parse_weights, preference_pairs, reward, write_pairs
from comfyui_troupe.evaluation.bench.results import columns
from comfyui_troupe.evaluation.bench.spec import SpecError, load_spec
from comfyui_troupe.training.manifest import read_manifest, validate_manifest

TEMPLATE = Path(__file__).resolve().parents[1] / "server" / "bench" / "tiny_sdxl_template.json"
# (dino_mean, clip_i_mean, dino_margin_mean, clip_i_margin_mean) per seed; default weights 1, 1, 0.5, 0.5
SCORES = {0: (0.50, 0.60, 0.10, 0.20), 1: (0.70, 0.65, 0.30, 0.10), 2: (0.40, 0.50, -0.10, 0.00)}
# rewards by hand: seed 0: 0.5 + 0.6 + 0.05 + 0.1 = 1.25; seed 1: 0.7 + 0.65 + 0.15 + 0.05 = 1.55; seed 2: 0.9 - 0.05 = 0.85
REWARDS = {0: 1.25, 1: 1.55, 2: 0.85}


@pytest.fixture
def run(tmp_path: Path):
    """A 2-case spec with 3 seeds and a results.csv as the runner writes it (scores made up, images real files)."""
    spec_path = tmp_path / "spec.json"
    spec = msbench_spec(Namespace(combinations="living_object", per_combination=1, prompts=2, sample_seed=3,
                                  spec=spec_path))
    spec.update(workflow=str(TEMPLATE), width=64, height=64, seeds=[0, 1, 2], settings={"on": {}})
    spec_path.write_text(json.dumps(spec))
    loaded = load_spec(spec_path)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(loaded.max_subjects))
        w.writeheader()
        for case in loaded.cases:
            for seed, (d, c, dm, cm) in SCORES.items():
                image = f"images/{len(list((out / 'images').iterdir())):03d}.png"
                Image.new("RGB", (64, 64), (seed * 60, 90, 120)).save(out / image)
                w.writerow({"case": case.id, "setting": "on", "seed": seed, "prompt": case.prompt, "image": image,
                            "scores": "x.json", "dino_mean": d, "clip_i_mean": c, "dino_margin_mean": dm,
                            "clip_i_margin_mean": cm, "clip_t": ""})
    return loaded, out


def test_rewards_and_best_against_worst_by_hand(run):
    spec, out = run
    from comfyui_troupe.evaluation.bench.results import read_rows

    rows = read_rows(out / "results.csv")
    assert [round(reward(r, parse_weights("dino_mean=1,clip_i_mean=1,dino_margin_mean=0.5,clip_i_margin_mean=0.5")), 6)
            for r in rows[:3]] == [REWARDS[0], REWARDS[1], REWARDS[2]]
    pairs = preference_pairs(spec, rows)
    assert len(pairs) == len(spec.cases)  # one per case: seed 1 (1.55) over seed 2 (0.85)
    for p, case in zip(pairs, spec.cases):
        assert p["meta"]["seeds"] == [1, 2] and p["scores"] == [REWARDS[1], REWARDS[2]]
        assert p["caption"] == case.prompt
        assert [s["box"] for s in p["subjects"]] == [list(b) for b in case.boxes]
    # every pair, and a gap that keeps only the pairs 0.3 or more apart (1-0: 0.3, 1-2: 0.7, 0-2: 0.4)
    assert len(preference_pairs(spec, rows, mode="all")) == 3 * len(spec.cases)
    gap = preference_pairs(spec, rows, mode="all", min_gap=0.35)
    assert sorted(tuple(p["meta"]["seeds"]) for p in gap[:2]) == [(0, 2), (1, 2)]
    # another reward: DINO alone ranks seed 1 (0.7) over seed 2 (0.4) as well, and seed 0 over seed 2
    assert preference_pairs(spec, rows, weights={"dino_mean": 1.0})[0]["scores"] == [0.7, 0.4]


def test_the_pairs_file_is_a_valid_training_manifest(run):
    spec, out = run
    path, n = write_pairs(spec, out)
    report = validate_manifest(path)
    assert report.ok, report.problems
    records = read_manifest(path)
    assert len(records) == n == len(spec.cases)
    assert all(r.loser is not None and r.loser.exists() and r.scores[0] > r.scores[1] for r in records)


def test_bad_weights_and_missing_metrics_are_named(run):
    spec, out = run
    with pytest.raises(SpecError, match="write metric=weight with a metric among"):
        parse_weights("dino=1")
    with pytest.raises(SpecError, match="non-zero weight"):
        parse_weights("dino_mean=0")
    from comfyui_troupe.evaluation.bench.results import read_rows

    with pytest.raises(SpecError, match=r"the results have no clip_t"):
        preference_pairs(spec, read_rows(out / "results.csv"), weights={"clip_t": 1.0})
    with pytest.raises(SpecError, match=r"--setting: 'off' is not a setting"):
        preference_pairs(spec, read_rows(out / "results.csv"), setting="off")
    (out / "results.csv").unlink()
    with pytest.raises(SpecError, match="run the spec first"):
        write_pairs(spec, out)
