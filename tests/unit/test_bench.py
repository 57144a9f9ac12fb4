"""The benchmark runner without a server: spec generators (MS-Bench, DynaIP Table 3), spec checks, graph filling,
the resumable CSV, the paired bootstrap, the report; and ``make bench``'s FLOP estimates and table arithmetic."""
from __future__ import annotations

import csv
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_troupe.evaluation.bench import generators
from comfyui_troupe.evaluation.bench.__main__ import main
from comfyui_troupe.evaluation.bench.compare import compare_settings
from comfyui_troupe.evaluation.bench.graph import SAVE_ID, build_graph
from comfyui_troupe.evaluation.bench.report import PALETTE, write_report
from comfyui_troupe.evaluation.bench.results import ResultsCsv, columns, row_from_scores
from comfyui_troupe.evaluation.bench.spec import SpecError, load_spec, parse_spec
from comfyui_troupe.evaluation.stats import bootstrap_ci, paired_difference

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))  # the benchmark scripts' shared module (FLOP formulas, the table)
import bench_common as bc

TEMPLATE = ROOT / "tests" / "server" / "bench" / "tiny_sdxl_template.json"
TABLE3 = [  # DynaIP (004) Table 3, as printed: type, template, the 6 variations [P]
    ("living+living", "a {0} and a {1} [P], {0} on the left, and {1} on the right", "in a room"),
    ("human+human", "a {0} and a {1} [P], {0} on the left, and {1} on the right", "embracing"),
    ("living+upwearing", "a {0} wearing a {1} [P]", "in the snow"),
    ("midwearing+downwearing", "a woman wearing a {0} and {1} [P]", "on a cobblestone street"),
    ("object+object+object", "a {0}, a {1}, and a {2} [P], {0} on the left, {1} on the middle, and {2} on the right",
     "on the grass"),
    ("human+human+character", "a {0}, a {1}, and a {2} [P], {0} on the left, {1} on the middle, and {2} on the right",
     "are taking a photo together"),
    ("upwearing+midwearing+downwearing", "a woman wearing a {0}, a {1}, and a {2} [P]", "in the jungle"),
]


def ns(spec: Path, **kw) -> Namespace:
    base = {"combinations": "", "per_combination": None, "prompts": None, "sample_seed": 0, "spec": spec,
            "subjects": ""}
    return Namespace(**{**base, **kw})


# --------------------------------------------------------------------------- generators


def test_msbench_spec_has_its_13_types_39_photos_boxes_and_prompts(msbench, tmp_path):
    data = json.loads((msbench / "msbench.json").read_text())
    assert len(data["combinations"]) == 13 and len(data["subjects"]) == 39
    spec_path = tmp_path / "ms.json"
    spec = generators.msbench_spec(ns(spec_path))
    counts = {cat: sum(s["category"] == cat for s in data["subjects"].values())
              for cat in {s["category"] for s in data["subjects"].values()}}
    for comb, entry in data["combinations"].items():
        cats = comb.split("_")
        # independent count: unordered draws within a repeated category, products across categories
        tuples = math.prod(math.comb(counts[c], cats.count(c)) for c in dict.fromkeys(cats))
        cases = [c for c in spec["cases"] if c["combination"] == comb]
        assert len(cases) == tuples * len(entry["prompts"]), comb
        assert all(c["boxes"] == entry["boxes"] and c["template"] in entry["prompts"] for c in cases)
    used = {s["image"] for c in spec["cases"] for s in c["subjects"]}
    assert len(used) == 39
    spec.update(workflow=str(TEMPLATE))
    spec_path.write_text(json.dumps(spec))
    loaded = load_spec(spec_path)  # every image path resolves, every prompt formats
    case = next(c for c in loaded.cases if c.id == "living_object/dog+teapot/p1")
    assert case.prompt == "a dog and a teapot in the snow" and [s.label for s in case.subjects] == ["dog", "teapot"]
    assert next(c for c in loaded.cases if c.id.startswith("object_object/colorful_sneaker+")).subjects[0].label \
        == "sneaker"


def test_msbench_sampling_is_deterministic_and_limited(tmp_path):
    a = generators.msbench_spec(ns(tmp_path / "s.json", combinations="living_living,object_scene", per_combination=3,
                                   prompts=2, sample_seed=5))
    b = generators.msbench_spec(ns(tmp_path / "s.json", combinations="living_living,object_scene", per_combination=3,
                                   prompts=2, sample_seed=5))
    assert a == b and len(a["cases"]) == 2 * 3 * 2 - 3  # object_scene has one prompt template
    with pytest.raises(SystemExit, match="unknown MS-Bench combination"):
        generators.msbench_spec(ns(tmp_path / "s.json", combinations="dog_dog"))


def test_dynaip_table3_is_transcribed_and_generated(msbench, tmp_path):
    table = json.loads(generators.DYNAIP.read_text())
    types = {t["type"]: t for t in table["types"]}
    assert len(types) == 14 and len(table["data_types"]) == 8
    assert all(len(t["variations"]) == 6 for t in types.values())
    for name, template, variation in TABLE3:
        assert types[name]["template"] == template and variation in types[name]["variations"], name
    spec = generators.dynaip_spec(ns(tmp_path / "d.json", per_combination=1, prompts=6))
    made = {c["combination"] for c in spec["cases"]}
    assert made == {t for t in types if "human" not in t and "character" not in t}  # MS-Bench has no people
    case = next(c for c in spec["cases"] if c["combination"] == "living+object" and c["id"].endswith("/p1"))
    assert case["template"] == "a {0} and a {1} in the snow, {0} on the left, and {1} on the right"
    extra = tmp_path / "people.json"  # your own photos for the human and character types
    extra.write_text(json.dumps({"human": [{"label": "man", "image": str(msbench / "images/living/cat.jpg")},
                                           {"label": "woman", "image": str(msbench / "images/living/dog.jpg")}],
                                 "character": [{"label": "robot", "image": str(msbench / "images/object/clock.jpg")}]}))
    spec = generators.dynaip_spec(ns(tmp_path / "d.json", per_combination=1, prompts=1, subjects=str(extra)))
    assert {c["combination"] for c in spec["cases"]} == set(types) - {"character+character"}  # one character only
    hh = next(c for c in spec["cases"] if c["combination"] == "human+human")
    assert hh["template"].startswith("a {0} and a {1} embracing, {0} on the left")
    assert [s["label"] for s in hh["subjects"]] == ["man", "woman"]


def test_cli_writes_a_spec_the_runner_loads(tmp_path, capsys):
    out = tmp_path / "specs" / "ms.json"
    assert main(["msbench", "--workflow", str(TEMPLATE), "--spec", str(out), "--combinations", "living_object",
                 "--per-combination", "2", "--prompts", "1", "--seeds", "0,7", "--width", "512", "--height", "384",
                 "--settings", '{"on": {}, "off": {"16.model": ["1", 0]}}']) == 0
    spec = load_spec(out)
    assert len(spec.cases) == 2 and spec.seeds == (0, 7) and (spec.width, spec.height) == (512, 384)
    assert [r.setting for r in spec.runs()[:2]] == ["on", "off"] and len(spec.runs()) == 8
    assert spec.comparisons() == (("on", "off"),)
    assert "ms.json: 2 cases" in capsys.readouterr().out


# --------------------------------------------------------------------------- spec checks


def good_case(msbench) -> dict:
    return {"id": "c1", "subjects": [{"label": "dog", "image": str(msbench / "images/living/dog.jpg")},
                                     {"label": "cat", "image": str(msbench / "images/living/cat.jpg")}],
            "boxes": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], "template": "a {0} and a {1}", "combination": "living_living"}


@pytest.mark.parametrize("patch,message", [
    (lambda s: s.update(workflow={"nodes": [], "links": []}), "not an API-format graph"),
    (lambda s: s.update(workflow="missing.json"), "workflow: 'missing.json' not found"),
    (lambda s: s["cases"][0].pop("id"), "cases[0]: give every case an 'id'"),
    (lambda s: s["cases"][0]["subjects"][1].update(image="nope.jpg"), "case 'c1' subject 2: image 'nope.jpg' not found"),
    (lambda s: s["cases"][0]["boxes"].pop(), "'boxes' must hold one [x0, y0, x1, y1] per subject (2)"),
    (lambda s: s["cases"][0]["boxes"].__setitem__(0, [0.5, 0, 0.2, 1]), "case 'c1' box 1: need 0 <= x0 < x1 <= 1"),
    (lambda s: s["cases"][0].update(template="a {0}, a {1} and a {2}"), "names a subject that is not there"),
    (lambda s: s["cases"].append(dict(s["cases"][0])), "case ids must be unique; repeated: c1"),
    (lambda s: s.update(settings={"x": {"99.model": 1}}), "settings['x']: '99.model' is not '<node id>.<input>'"),
    (lambda s: s.update(compare=[["a", "b"]]), "compare: each entry is [baseline, other]"),
    (lambda s: s.update(seeds=[]), "seeds: a non-empty list of integers"),
])
def test_bad_specs_are_refused_with_the_field_and_the_fix(msbench, patch, message):
    raw = {"workflow": str(TEMPLATE), "cases": [good_case(msbench)]}
    patch(raw)
    with pytest.raises(SpecError) as err:
        parse_spec(raw, ROOT)
    assert message in str(err.value)


# --------------------------------------------------------------------------- graph


def test_the_template_is_filled_for_one_run(msbench):
    raw = {"workflow": str(TEMPLATE), "width": 320, "height": 192, "seeds": [5],
           "settings": {"off": {"16.model": ["1", 0], "16.cfg": 1.0}}, "cases": [good_case(msbench)]}
    spec = parse_spec(raw, ROOT)
    (run,) = spec.runs()
    uploaded = {str(s.image): f"up_{s.label}.jpg" for s in run.case.subjects}
    graph, fid, save = build_graph(spec.workflow, run, spec.settings, spec.width, spec.height, uploaded)
    assert spec.workflow["16"]["inputs"]["seed"] == "$seed"  # the template itself is untouched
    assert graph["16"]["inputs"]["seed"] == 5 and graph["15"]["inputs"]["width"] == 320  # typed placeholders
    assert graph["16"]["inputs"]["model"] == ["1", 0] and graph["16"]["inputs"]["cfg"] == 1.0  # the setting
    assert graph["7"]["inputs"] == {"subject_1": ["troupe_bench_subject_1", 0], "subject_2": ["troupe_bench_subject_2", 0]}
    assert graph["troupe_bench_subject_2"]["inputs"] == {"image": ["troupe_bench_load_2", 0], "label": "cat",
                                                         "weight": 1.0}
    assert graph["troupe_bench_load_1"]["inputs"]["image"] == "up_dog.jpg"
    boxes = json.loads(graph["8"]["inputs"]["boxes"])
    assert boxes["boxes"][1] == {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0, "label": "cat"}
    assert (graph["8"]["inputs"]["width"], graph["8"]["inputs"]["height"]) == (320, 192)
    assert fid == "22" and graph[fid]["inputs"]["prompt"] == "a dog and a cat"
    assert save == SAVE_ID and graph[save]["inputs"]["images"] == ["18", 0]


def test_a_template_without_the_fidelity_node_is_refused(msbench):
    raw = {"workflow": {k: v for k, v in json.loads(TEMPLATE.read_text()).items() if k != "22"},
           "cases": [good_case(msbench)]}
    spec = parse_spec(raw, ROOT)
    with pytest.raises(SpecError, match="needs exactly one TroupeFidelity node, found 0; add TroupeFidelity wired"):
        build_graph(spec.workflow, spec.runs()[0], spec.settings, 64, 64, {})


# --------------------------------------------------------------------------- CSV


SCORES = {"clip_t": 0.25, "crop": "pad", "backbones": {"clip_image": "ci", "clip_text": "ct", "dino": "d"},
          "subjects": [{"label": "dog", "clip_i": 0.9, "clip_i_margin": 0.3, "clip_i_leakage": {"cat": 0.6},
                        "dino": 0.8, "dino_margin": -0.1, "dino_leakage": {"cat": 0.9}},
                       {"label": "cat", "clip_i": 0.7, "clip_i_margin": 0.1, "clip_i_leakage": {"dog": 0.6},
                        "dino": 0.5, "dino_margin": 0.2, "dino_leakage": {"dog": 0.3}}],
          "matrices": {"clip_i": {"mean": 0.8, "mean_margin": 0.2}, "dino": {"mean": 0.65, "mean_margin": 0.05}}}


def test_csv_rows_resume_and_survive_a_torn_line(msbench, tmp_path):
    spec = parse_spec({"workflow": str(TEMPLATE), "settings": {"a": {}, "b": {}}, "cases": [good_case(msbench)]}, ROOT)
    runs = spec.runs()
    path = tmp_path / "results.csv"
    results = ResultsCsv(path, 2)
    row = row_from_scores(runs[0], SCORES, "images/x.png", "heatmaps/x.png", "scores/x.json", "pid", 1.5)
    assert row["s1_clip_i_leak"] == "0.600000" and row["s1_dino_leak"] == "0.900000" and row["clip_i_mean"] == "0.800000"
    assert all(row[c] != "" for c in columns(2))
    results.append(row)
    with path.open("a") as f:
        f.write("c1,,b,0,a dog")  # a kill in the middle of writing the next row
    again = ResultsCsv(path, 2)
    assert set(again.done) == {runs[0].key}
    again.append(row_from_scores(runs[1], SCORES, "i", "h", "s", "pid2", 2.0))
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["a", "b"]  # the torn line is gone, the new row on its own line
    with pytest.raises(SpecError, match="was written for another spec"):
        ResultsCsv(path, 3)


# --------------------------------------------------------------------------- statistics


def test_bootstrap_matches_an_explicit_resampling_loop():
    d = np.array([0.3, -0.1, 0.25, 0.05, 0.4, -0.2, 0.15])
    rng = np.random.default_rng(0)  # the same draws, taken one resample at a time
    means = []
    for _ in range(2000):
        idx = rng.integers(0, len(d), size=(1, len(d)))[0]
        means.append(sum(d[i] for i in idx) / len(d))
    means.sort()
    # numpy's default quantile: linear interpolation between order statistics
    def q(p):
        h = (len(means) - 1) * p
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])
    assert bootstrap_ci(d, resamples=2000, seed=0) == pytest.approx((q(0.025), q(0.975)), abs=1e-12)


def test_bootstrap_agrees_with_the_normal_interval_for_many_items():
    d = np.random.default_rng(3).normal(0.02, 0.1, size=400)
    low, high = bootstrap_ci(d)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_the_comparison_is_paired_by_case_and_seed():
    """b = a + 0.01 on every item while a varies a lot: the paired interval is tight around 0.01."""
    a = np.random.default_rng(1).uniform(0.2, 0.9, size=30)
    diff = paired_difference("clip_i", list(a), list(a + 0.01))
    assert diff.mean_diff == pytest.approx(0.01) and diff.low == pytest.approx(0.01) and diff.high == pytest.approx(0.01)
    assert diff.significant and diff.n == 30
    rows = [{"case": f"c{i}", "seed": "0", "setting": s, "clip_i_mean": str(v)}
            for i in range(30) for s, v in (("a", a[i]), ("b", a[i] + 0.01))]
    rows.append({"case": "extra", "seed": "0", "setting": "b", "clip_i_mean": "0.0"})  # no partner: left out
    (d,) = compare_settings(rows, "a", "b", metrics=("clip_i_mean",))
    assert d.n == 30 and d.mean_diff == pytest.approx(0.01, abs=1e-9)
    flat = paired_difference("x", [1.0, None, 2.0], [1.5, 3.0, float("nan")])
    assert flat.n == 1 and flat.low == flat.high == pytest.approx(0.5)


# --------------------------------------------------------------------------- report


def test_report_palette_is_the_packs_and_missing_runs_show(msbench, tmp_path):
    from PIL import Image

    from comfyui_troupe.models.layout.layout import PALETTE as PACK_PALETTE

    assert PALETTE == PACK_PALETTE
    spec = parse_spec({"workflow": str(TEMPLATE), "settings": {"a": {}, "b": {}}, "cases": [good_case(msbench)]}, ROOT)
    for name in ("images/x.png", "heatmaps/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 32), (10, 20, 30)).save(tmp_path / name)
    row = row_from_scores(spec.runs()[0], SCORES, "images/x.png", "heatmaps/x.png", "scores/x.json", "p", 1.0)
    page = write_report(tmp_path, spec, [row], {}).read_text()
    assert page.count("<img class=output") == 1 and page.count("<img class=heatmap") == 1
    assert "not run yet" in page and "<table class=scores>" in page and "Nothing" not in page
    assert "class='num neg'>-0.1000" in page  # a negative identity margin is marked


# --------------------------------------------------------------------------- make bench: FLOP estimates and the table
# scripts/bench_common.py holds the FLOP formulas the benchmark tables divide by; each is checked against a hand
# count and against torch's own FlopCounterMode on real ComfyUI FLUX blocks (tiny width, same structure).


def test_attention_and_linear_flops_match_a_hand_count_and_torchs_counter():
    # hand count: Q K^T is 3 x 5 dot products of width 8 (8 multiply-adds each), A V the same: 2 x 120 MACs
    assert bc.attention_flops(3, 5, 8) == 2 * (2 * 3 * 5 * 8)
    assert bc.linear_flops(7, 4, 6) == 2 * 7 * 4 * 6
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)  # 2 heads of 4: width 8
    counted = bc.counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert counted == bc.attention_flops(3, 5, 8)
    lin = torch.nn.Linear(4, 6)
    assert bc.counted_flops(lambda: lin(torch.randn(7, 4))) == bc.linear_flops(7, 4, 6)


def _flux_block_inputs(dit, n_txt: int, n_img: int):
    g = torch.Generator().manual_seed(0)
    d = dit.hidden_size
    ids = torch.zeros(1, n_txt + n_img, 3)
    ids[0, n_txt:, 1] = torch.arange(n_img) // 4
    ids[0, n_txt:, 2] = torch.arange(n_img) % 4
    pe = dit.pe_embedder(ids)
    return (torch.randn(1, n_img, d, generator=g), torch.randn(1, n_txt, d, generator=g),
            torch.randn(1, d, generator=g), pe)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_flux_block_flops_equal_torchs_count_on_comfyui_blocks(kind):
    """24 D^2 per token + 4 n^2 D per block: the difference between two token counts, counted by torch on ComfyUI's
    own blocks, equals the formula's exactly (the modulation, per batch row, cancels in the difference)."""
    from fixtures.tiny_models import tiny_flux

    dit = tiny_flux().model.diffusion_model
    width = dit.hidden_size

    def count(n_txt, n_img):
        img, txt, vec, pe = _flux_block_inputs(dit, n_txt, n_img)
        with torch.inference_mode():
            if kind == "double":
                return bc.counted_flops(lambda: dit.double_blocks[0](img=img, txt=txt, vec=vec, pe=pe))
            return bc.counted_flops(lambda: dit.single_blocks[0](torch.cat((txt, img), 1), vec=vec, pe=pe))

    small, large = count(3, 8), count(5, 16)
    assert large - small == bc.flux_block_flops(21, width) - bc.flux_block_flops(11, width)
    # by hand at D = 64, 21 tokens: QKV 3 D^2 + proj D^2 + MLP 8 D^2 = 12 D^2 MACs per token, and 21^2 x D x 2 MACs
    assert bc.flux_block_flops(21, 64) == 2 * (12 * 64 * 64 * 21) + 2 * (2 * 21 * 21 * 64)


def test_reference_branch_estimates_by_hand_and_by_torchs_count():
    # self_cached: 2 blocks, 3 query rows, 4 cached reference keys, width 8: 2 x (3 x 4 x 8 MACs) x 2 per block
    assert bc.reference_self_cached_flops(3, 4, 8, blocks=2) == 2 * (2 * 3 * 4 * 8) * 2
    q = torch.randn(1, 2, 6, 4)
    k, v = torch.randn(1, 2, 6 + 10, 4), torch.randn(1, 2, 6 + 10, 4)  # [own keys | 10 cached reference keys]
    joint = bc.counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    alone = bc.counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :6], v[:, :, :6]))
    assert joint - alone == bc.reference_self_cached_flops(6, 10, 8, blocks=1)
    # ReferenceLatent: every block on n + R tokens: 24 D^2 R more products and 4 D ((n + R)^2 - n^2) more attention
    n, r, d = 5, 3, 8
    assert bc.reference_latent_flops(2, 3, r, d, blocks=2) == 2 * (24 * d * d * r + 4 * d * ((n + r) ** 2 - n ** 2))
    # the issue's figure, full FLUX.1 double block at 512 px (1024 image + 512 text tokens), 4 x 1024 reference keys:
    # image queries only 13.7 % of the block; the branch's joint attention also lets the 512 text queries attend to
    # the references, so its estimate is 20.5 %
    block = bc.flux_block_flops(1536, 3072)
    assert bc.reference_self_cached_flops(1024, 4096, 3072, 1) / block == pytest.approx(0.1367, abs=5e-4)
    assert bc.reference_self_cached_flops(1536, 4096, 3072, 1) / block == pytest.approx(0.2051, abs=5e-4)


def test_kv_projection_flops_count_both_linears_and_the_bias():
    assert bc.kv_projection_flops(16, 4096, 3072) == 2 * (2 * 16 * 4096 * 3072)
    assert bc.kv_projection_flops(16, 4096, 3072, bias=True) == 2 * (2 * 16 * 4096 * 3072) + 2 * 16 * 3072


def test_family_table_medians_ratios_and_peers_not_run():
    """The table's arithmetic on fixed numbers (no timing): medians over rounds, added time paired by round, and
    measured / FLOP estimate = time inside the term / (estimated FLOP / the base's measured FLOP rate)."""
    base = bc.Config("base", run=None)
    base.first, base.steady, base.memory = [3.0, 3.4, 3.2], [2.0, 2.4, 2.2], [100 * 2**20, 110 * 2**20, 90 * 2**20]
    base.wall = [1.1, 1.3, 1.2]
    patch = bc.Config("patch", run=None, flops=1e9, inside=bc.Inside(), formula="4 q k w")
    patch.first, patch.steady, patch.wall = [5.0, 5.6, 5.2], [2.1, 2.6, 2.3], [1.2, 1.5, 1.4]
    patch.inside_s, patch.memory, patch.cache_bytes = [0.04, 0.06, 0.05], [150 * 2**20] * 3, 64 * 2**20
    patch.counted = 1.1e9
    table = bc.family_table("T", "setting", [base, patch, bc.NotRun("peer: X", "no --peer-x checkout given")],
                            base_flops=22e9, rounds=3, steps=3)
    row = next(line for line in table.splitlines() if line.startswith("| patch |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # steady median 2.3, x base 2.3 / 2.2; first 5.2 (setup 5.2 - 2.3 = 2.9, base's 3.2 - 2.2 = 1.0: +1.90 more)
    assert cells[1] == "2.30 (1.40)" and cells[2] == f"{2.3 / 2.2:.3f}" and cells[3] == "5.20 (+1.90 vs base)"
    assert cells[4] == "+0.100"  # paired by round: 0.1, 0.2, 0.1 -> median 0.1
    assert cells[5] == "50" and cells[6] == "150 (+40)" and cells[7] == "64" and cells[8] == "1.00 (1.10)"
    # rate = 22 GFLOP / 2.2 CPU s = 10 GFLOP/s, so 1 GFLOP is 0.1 s; 0.05 s measured inside the term -> 0.50
    assert cells[9] == "0.50"
    assert "| peer: X | not run: no --peer-x checkout given |" in table and "- patch: 4 q k w" in table


def test_self_cached_reference_cache_holds_only_each_blocks_k_and_v():
    """The per-run cache ``make bench`` reports for the reference branch: every block's rotated K and V of the
    references and nothing more, blocks x 2 x R x D values (V used to be a view that kept the whole fused qkv /
    linear1 output alive: 2x the size in double blocks, 4x in single blocks)."""
    from fixtures.tiny_models import tiny_flux

    from comfyui_troupe.models.reference.branch import ReferenceBranch, ReferenceOptions, sdpa_attention
    from comfyui_troupe.models.reference.hooks import prepare_stream

    dit = tiny_flux().model.diffusion_model
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(16, 8, 8, generator=g) for _ in range(3)]  # 3 references of 4 x 4 = 16 tokens
    branch = ReferenceBranch(dit=dit, latents=lats, ref_subject=[0, 1, 2],
                             options=ReferenceOptions(attention="self_cached"), lora=None)
    with torch.inference_mode():
        stream = prepare_stream(branch, torch.zeros(1, 16, 8, 8), None, sdpa_attention, run={})
    blocks = len(dit.double_blocks) + len(dit.single_blocks)
    assert len(stream.kv) == blocks
    assert bc.tensor_bytes(stream.kv) == blocks * 2 * (3 * 16) * dit.hidden_size * 4  # fp32



def test_sdxl_attention_layers_by_hand():
    """SDXL at a 64 x 64 latent (512 px): level 1 (32 x 32 tokens, width 640) has 2 + 2 input and 3 x 2 output
    transformer blocks, level 2 (16 x 16, width 1280) 10 + 10 input, 10 middle and 3 x 10 output: 10 + 60 = 70."""
    import bench_sdxl

    layers = bench_sdxl.attention_layers(bench_sdxl.FULL_SDXL_UNET, 64)
    assert sorted(layers) == sorted([(1024, 640)] * 10 + [(256, 1280)] * 60)
    quick = bench_sdxl.attention_layers(bench_sdxl.QUICK_SDXL_UNET, 32)  # depth 1 everywhere: 2 + 3, 2 + 1 + 3
    assert sorted(quick) == sorted([(256, 640)] * 5 + [(64, 1280)] * 6)
    # the regional term: 4 x (pixel, subject) pairs x tokens x width, summed over layers
    assert bench_sdxl.regional_flops([(256, 1280), (1024, 640)], lambda p: p // 4, 64) == \
        4 * 64 * 64 * 1280 + 4 * 256 * 64 * 640
