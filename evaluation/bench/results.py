"""The results CSV: one row per case, seed and setting, every metric per subject; written row by row so a run resumes."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .spec import Run, SpecError

RUN_COLUMNS = ("case", "combination", "setting", "seed", "prompt", "n_subjects", "image", "heatmap", "scores",
               "prompt_id", "seconds")
SUMMARY_COLUMNS = ("clip_t", "clip_i_mean", "clip_i_margin_mean", "dino_mean", "dino_margin_mean")
SUBJECT_FIELDS = ("label", "clip_i", "clip_i_margin", "clip_i_leak", "dino", "dino_margin", "dino_leak")
BACKBONE_COLUMNS = ("crop", "clip_image", "clip_text", "dino_backbone")
# the metrics compared between settings (subject means per image)
COMPARED = SUMMARY_COLUMNS


def columns(max_subjects: int) -> list[str]:
    per_subject = [f"s{k}_{f}" for k in range(1, max_subjects + 1) for f in SUBJECT_FIELDS]
    return [*RUN_COLUMNS, *SUMMARY_COLUMNS, *per_subject, *BACKBONE_COLUMNS]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def row_from_scores(run: Run, scores: dict, image: str, heatmap: str, scores_path: str, prompt_id: str,
                    seconds: float) -> dict[str, str]:
    """A CSV row from TroupeFidelity's JSON (one image)."""
    subjects = scores.get("subjects", [])
    matrices = scores.get("matrices", {})
    row = {"case": run.case.id, "combination": run.case.combination, "setting": run.setting, "seed": run.seed,
           "prompt": run.case.prompt, "n_subjects": len(subjects), "image": image, "heatmap": heatmap,
           "scores": scores_path, "prompt_id": prompt_id, "seconds": round(seconds, 3),
           "clip_t": scores.get("clip_t"), "crop": scores.get("crop"),
           "clip_image": scores.get("backbones", {}).get("clip_image"),
           "clip_text": scores.get("backbones", {}).get("clip_text"),
           "dino_backbone": scores.get("backbones", {}).get("dino")}
    for name in ("clip_i", "dino"):
        m = matrices.get(name)
        row[f"{name}_mean"] = None if m is None else m.get("mean")
        row[f"{name}_margin_mean"] = None if m is None else m.get("mean_margin")
    for k, s in enumerate(subjects, start=1):
        row[f"s{k}_label"] = s.get("label")
        for name in ("clip_i", "dino"):
            row[f"s{k}_{name}"] = s.get(name)
            row[f"s{k}_{name}_margin"] = s.get(f"{name}_margin")
            leak = s.get(f"{name}_leakage") or {}
            row[f"s{k}_{name}_leak"] = max(leak.values()) if leak else None
    return {k: _fmt(v) for k, v in row.items()}


class ResultsCsv:
    """results.csv in the output folder: the finished keys are read back, new rows appended and flushed one by one."""

    def __init__(self, path: Path, max_subjects: int):
        self.path = path
        self.columns = columns(max_subjects)
        self.done: dict[tuple[str, str, str], dict] = {}
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.columns:
                    raise SpecError(f"{path} was written for another spec (its columns differ: up to "
                                    f"{max_subjects} subjects here); write to a new --out folder, or delete it")
                for row in reader:
                    if row.get("case") and row.get("scores"):  # a torn last line (killed mid-write) is ignored
                        self.done[(row["case"], row["seed"], row["setting"])] = row
            self._rewrite_clean()
        else:
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns).writeheader()

    def _rewrite_clean(self) -> None:
        """Drop a partial last line left by a kill, so appends start on a fresh line."""
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            tmp = self.path.with_suffix(".tmp")
            with tmp.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(self.done.values())
            tmp.replace(self.path)

    def append(self, row: dict) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns).writerow({c: row.get(c, "") for c in self.columns})
            f.flush()
            os.fsync(f.fileno())
        self.done[(row["case"], str(row["seed"]), row["setting"])] = row


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
