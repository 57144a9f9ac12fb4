"""Spec generators: MS-Bench (13 combination types, their boxes and prompts, 39 photos) and DynaIP's Table 3.

Both read the data shipped in ``benchmarks/`` (``msbench/msbench.json``, ``dynaip/table3.json``) and write cases
whose image paths are relative to the spec file. Subject tuples: every choice of one subject per category in the
combination (a category used twice gives unordered pairs of different subjects), optionally sampled.
"""
from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MSBENCH = BENCHMARKS / "msbench"
DYNAIP = BENCHMARKS / "dynaip" / "table3.json"


def subject_tuples(categories: list[str], by_category: dict[str, list[str]]) -> list[tuple[str, ...]]:
    """One subject per category slot; repeated categories take different subjects, in increasing order."""
    pools = [by_category.get(c, []) for c in categories]
    out = []
    for combo in itertools.product(*pools):
        if len(set(combo)) != len(combo):
            continue
        same = [[i for i, c in enumerate(categories) if c == cat] for cat in dict.fromkeys(categories)]
        if all([combo[i] for i in idx] == sorted(combo[i] for i in idx) for idx in same):
            out.append(combo)
    return out


def sample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    return sorted(random.Random(seed).sample(items, n), key=items.index)


def relative(path: Path, spec_path: Path) -> str:
    return os.path.relpath(path.resolve(), spec_path.resolve().parent).replace(os.sep, "/")


def msbench_subjects() -> tuple[dict, dict[str, list[str]]]:
    data = json.loads((MSBENCH / "msbench.json").read_text(encoding="utf-8"))
    by_category: dict[str, list[str]] = {}
    for name, s in data["subjects"].items():
        by_category.setdefault(s["category"], []).append(name)
    return data, by_category


def msbench_spec(args) -> dict:
    """MS-Bench: every combination type (or those chosen), its boxes, its prompt templates, its photos."""
    data, by_category = msbench_subjects()
    chosen = args.combinations.split(",") if args.combinations else list(data["combinations"])
    unknown = [c for c in chosen if c not in data["combinations"]]
    if unknown:
        raise SystemExit(f"unknown MS-Bench combination(s) {unknown}; choose from {list(data['combinations'])}")
    cases = []
    for comb in chosen:
        entry = data["combinations"][comb]
        categories = comb.split("_")
        tuples = sample(subject_tuples(categories, by_category), args.per_combination, args.sample_seed)
        templates = entry["prompts"][:args.prompts] if args.prompts else entry["prompts"]
        for names in tuples:
            for k, template in enumerate(templates):
                subjects = [{"label": data["subjects"][n]["class"],
                             "image": relative(MSBENCH / data["subjects"][n]["image"], args.spec)} for n in names]
                cases.append({"id": f"{comb}/{'+'.join(names)}/p{k}", "combination": comb, "subjects": subjects,
                              "boxes": entry["boxes"], "template": template})
    return {"version": 1, "name": f"msbench ({len(chosen)} combination types)", "settings": {"default": {}},
            "cases": cases}


def msbench_args(p) -> None:
    p.add_argument("--combinations", default="", help="comma-separated combination types (default: all 13)")
    p.add_argument("--per-combination", type=int, default=None, help="sample this many subject tuples per type")
    p.add_argument("--prompts", type=int, default=None, help="use the first N prompt templates of each type")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the subject-tuple sampling")


def dynaip_spec(args) -> dict:
    """DynaIP Table 3: its 14 types and 6 variations each; MS-Bench photos plus your own humans and characters."""
    table = json.loads(DYNAIP.read_text(encoding="utf-8"))
    data, by_category = msbench_subjects()
    photos = {n: (data["subjects"][n]["class"], MSBENCH / data["subjects"][n]["image"]) for n in data["subjects"]}
    if args.subjects:
        extra = json.loads(Path(args.subjects).read_text(encoding="utf-8"))
        for category, items in extra.items():
            for item in items:
                name = f"{category}:{item['label']}:{Path(item['image']).stem}"
                path = Path(item["image"])
                photos[name] = (item["label"], path if path.is_absolute() else Path(args.subjects).parent / path)
                by_category.setdefault(category, []).append(name)
    cases, skipped = [], []
    for t in table["types"]:
        missing = [c for c in t["categories"] if not by_category.get(c)]
        if missing:
            skipped.append(f"{t['type']} (no {', '.join(sorted(set(missing)))} subjects)")
            continue
        boxes = data["combinations"][t["boxes_from"]]["boxes"]
        tuples = sample(subject_tuples(t["categories"], by_category), args.per_combination, args.sample_seed)
        variations = t["variations"][:args.prompts] if args.prompts else t["variations"]
        for names in tuples:
            for k, variation in enumerate(variations):
                subjects = [{"label": photos[n][0], "image": relative(photos[n][1], args.spec)} for n in names]
                ids = "+".join(n.split(":")[-1] for n in names)
                cases.append({"id": f"{t['type']}/{ids}/p{k}", "combination": t["type"], "subjects": subjects,
                              "boxes": boxes, "template": t["template"].replace("[P]", variation)})
    if skipped:
        print(f"skipped DynaIP types without subjects: {'; '.join(skipped)} (give them with --subjects)")
    return {"version": 1, "name": "DynaIP-Bench prompts (004, Table 3)", "settings": {"default": {}}, "cases": cases}


def dynaip_args(p) -> None:
    msbench_args(p)
    p.add_argument("--subjects", default="", help='JSON {"human": [{"label": "man", "image": "path"}], "character": '
                                                 "[...]}: photos for the categories MS-Bench lacks")


GENERATORS = {
    "msbench": (msbench_spec, msbench_args, "write a spec of MS-Bench's combination types, boxes, prompts and photos"),
    "dynaip": (dynaip_spec, dynaip_args, "write a spec of DynaIP's multi-subject prompt templates (004, Table 3)"),
}
