"""Two settings side by side: per metric, the mean difference over the same cases and seeds and its bootstrap 95% CI."""
from __future__ import annotations

import csv
from pathlib import Path

from ..stats import Difference, paired_difference
from .results import COMPARED


def value(row: dict, metric: str) -> float | None:
    text = row.get(metric, "")
    return float(text) if text not in ("", None) else None


def compare_settings(rows: list[dict], a: str, b: str, metrics=COMPARED, resamples: int = 10000) -> list[Difference]:
    """Setting ``b`` minus setting ``a``, paired by (case, seed); items missing in either are left out."""
    by_a = {(r["case"], r["seed"]): r for r in rows if r["setting"] == a}
    by_b = {(r["case"], r["seed"]): r for r in rows if r["setting"] == b}
    keys = sorted(set(by_a) & set(by_b))
    return [paired_difference(m, [value(by_a[k], m) for k in keys], [value(by_b[k], m) for k in keys],
                              resamples=resamples) for m in metrics]


def write_comparisons(path: Path, table: dict[tuple[str, str], list[Difference]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["baseline", "setting", "metric", "n", "mean_baseline", "mean_setting", "mean_diff", "ci95_low",
                    "ci95_high", "significant"])
        for (a, b), diffs in table.items():
            for d in diffs:
                w.writerow([a, b, d.metric, d.n, *(f"{x:.6f}" for x in (d.mean_a, d.mean_b, d.mean_diff, d.low,
                                                                       d.high)), int(d.significant)])
