"""Preference pairs from a benchmark run, for FocusDPO tuning (``method.name = "focusdpo"``).

A run of a spec with K seeds gives, for every case and setting, K images of the same prompt, layout and references,
each scored by TroupeFidelity. Each image's reward is a weighted sum of its scores (per-image means over the
subjects: DINO and CLIP-I fidelity and their identity margins, i.e. fidelity minus the worst leakage); within a case
the images are ranked by reward and written as (winner, loser) lines of a training manifest
(docs/training-data.md, "Preference pairs"): image paths relative to the run's folder, the case's prompt as the
caption, its boxes, and each subject's reference image.

Standard library only, like the rest of the runner.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from .results import SUMMARY_COLUMNS, read_rows
from .spec import Spec, SpecError

DEFAULT_WEIGHTS = {"dino_mean": 1.0, "clip_i_mean": 1.0, "dino_margin_mean": 0.5, "clip_i_margin_mean": 0.5}
MODES = ("best-worst", "all")
PAIRS_FILE = "pairs.jsonl"


def parse_weights(text: str) -> dict[str, float]:
    """``"dino_mean=1,clip_i_margin_mean=0.5"`` -> weights; each name one of the results' per-image metrics."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SUMMARY_COLUMNS:
            raise SpecError(f"--weights: {part!r}: write metric=weight with a metric among {', '.join(SUMMARY_COLUMNS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SpecError(f"--weights: {part!r}: the weight must be a number") from None
        if not math.isfinite(weights[name]):
            raise SpecError(f"--weights: {part!r}: the weight must be finite")
    if not weights or not any(weights.values()):
        raise SpecError("--weights: give at least one metric with a non-zero weight, e.g. dino_mean=1")
    return weights


def reward(row: dict, weights: dict[str, float]) -> float | None:
    """sum_m w_m * row[m]; None when a weighted metric is empty for this image (its backbone did not run)."""
    total = 0.0
    for name, w in weights.items():
        value = row.get(name, "")
        if value in ("", None):
            return None
        total += w * float(value)
    return total


def preference_pairs(spec: Spec, rows: list[dict], weights: dict[str, float] | None = None,
                     setting: str | None = None, min_gap: float = 0.0, mode: str = "best-worst") -> list[dict]:
    """Manifest records (dicts) of (winner, loser) pairs: per case and setting, the best image against the worst
    (``best-worst``) or every pair of images (``all``), when their rewards differ by at least ``min_gap``."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    if mode not in MODES:
        raise SpecError(f"--mode: {mode!r}; use one of {', '.join(MODES)}")
    if setting is not None and setting not in spec.settings:
        raise SpecError(f"--setting: {setting!r} is not a setting of the spec ({', '.join(spec.settings)})")
    cases = {c.id: c for c in spec.cases}
    groups: dict[tuple[str, str], list[tuple[float, dict]]] = defaultdict(list)
    unscored = set()
    for row in rows:
        if row.get("case") not in cases or (setting is not None and row.get("setting") != setting):
            continue
        r = reward(row, weights)
        if r is None:
            unscored.update(n for n in weights if row.get(n, "") in ("", None))
            continue
        groups[(row["case"], row["setting"])].append((r, row))
    if unscored and not groups:
        raise SpecError(f"--weights: the results have no {', '.join(sorted(unscored))} (the workflow's TroupeFidelity "
                        "did not compute it: DINO needs a dino model input); weight the metrics the run has")
    records = []
    for (case_id, set_name), scored in sorted(groups.items()):
        case = cases[case_id]
        scored.sort(key=lambda x: (-x[0], int(x[1]["seed"])))
        if mode == "best-worst":
            chosen = [(scored[0], scored[-1])] if len(scored) > 1 else []
        else:
            chosen = list(combinations(scored, 2))
        for (rw, w), (rl, lo) in chosen:
            if rw - rl < min_gap or rw == rl:
                continue
            records.append({
                "image": w["image"], "loser": lo["image"], "scores": [round(rw, 6), round(rl, 6)],
                "caption": case.prompt,
                "subjects": [{"label": s.label, "box": list(b), "references": [str(s.image)]}
                             for s, b in zip(case.subjects, case.boxes)],
                "meta": {"case": case_id, "setting": set_name, "seeds": [int(w["seed"]), int(lo["seed"])],
                         "weights": weights},
            })
    return records


def write_pairs(spec: Spec, out: Path, **kw) -> tuple[Path, int]:
    """``<out>/pairs.jsonl`` from ``<out>/results.csv`` (a finished or partial run); (its path, the pair count)."""
    results = out / "results.csv"
    if not results.exists():
        raise SpecError(f"{results} not found: run the spec first (python -m evaluation.bench run SPEC --out {out})")
    records = preference_pairs(spec, read_rows(results), **kw)
    if not records:
        raise SpecError("no pairs: every case needs at least two scored images with different rewards; give the "
                        "spec several seeds (\"seeds\": [0, 1, 2, 3]) and run it again")
    path = out / PAIRS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path, len(records)
