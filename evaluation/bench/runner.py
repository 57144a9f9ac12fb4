"""Run a spec through a ComfyUI server: every case x seed x setting, scored by the workflow's TroupeFidelity node.

Each finished run leaves its image, heat-map and scores JSON in the output folder and then one CSV row (flushed
and synced), so a run that is killed loses at most the prompt in flight: started again with the same ``--out`` it
skips every row the CSV holds. At the end: comparisons.csv and report.html.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .client import ComfyClient, ServerError
from .compare import compare_settings, write_comparisons
from .graph import FIDELITY, SUBJECT, build_graph, check_template
from .report import write_report
from .results import ResultsCsv, read_rows, row_from_scores
from .spec import Run, Spec


@dataclass
class Summary:
    total: int
    skipped: int
    finished: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    report: Path | None = None


class Progress:
    """A progress bar over the runs (tqdm when installed, else one line per run)."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.bar = None
        self.total, self.count, self.enabled = total, done, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="run", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def step(self, run: Run, note: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_description(f"case {run.case.id}")
            self.bar.set_postfix_str(f"{run.setting}, seed {run.seed}: {note}")
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.count}/{self.total}] case {run.case.id}, {run.setting}, seed {run.seed}: {note}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def scores_of(entry: dict, node_id: str) -> tuple[dict, dict]:
    """TroupeFidelity's JSON and its heat-map image entry from a finished prompt's history."""
    out = entry.get("outputs", {}).get(node_id, {})
    if not out.get("text") or not out.get("images"):
        raise ServerError(f"TroupeFidelity (node {node_id}) returned no scores; is it an output of this workflow?")
    scores = json.loads(out["text"][0])
    if "images" in scores:
        raise ServerError("TroupeFidelity scored a batch of images; the runner takes one image per run (batch 1)")
    return scores, out["images"][0]


def execute(client: ComfyClient, spec: Spec, run: Run, out: Path, uploaded: dict[str, str]) -> dict:
    """Queue one run, wait, save its files, return its CSV row."""
    for s in run.case.subjects:
        if str(s.image) not in uploaded:
            uploaded[str(s.image)] = client.upload(s.image)
    graph, fid, save = build_graph(spec.workflow, run, spec.settings, spec.width, spec.height, uploaded)
    start = time.monotonic()
    prompt_id = client.queue(graph)
    entry = client.wait(prompt_id)
    seconds = time.monotonic() - start
    scores, heat = scores_of(entry, fid)
    images = entry.get("outputs", {}).get(save, {}).get("images", [])
    if len(images) != 1:
        raise ServerError(f"expected one generated image, got {len(images)}; set the batch size to 1")
    image = Path("images") / f"{run.slug}.png"
    heatmap = Path("heatmaps") / f"{run.slug}.png"
    scores_path = Path("scores") / f"{run.slug}.json"
    client.download(images[0], out / image)
    client.download(heat, out / heatmap)
    (out / scores_path).parent.mkdir(parents=True, exist_ok=True)
    (out / scores_path).write_text(json.dumps(scores, indent=1), encoding="utf-8")
    return row_from_scores(run, scores, image.as_posix(), heatmap.as_posix(), scores_path.as_posix(), prompt_id,
                           seconds)


def finish(spec: Spec, out: Path, resamples: int = 10000) -> Path:
    """comparisons.csv and report.html from the CSV as it stands (also after a partial run)."""
    rows = read_rows(out / "results.csv")
    table = {(a, b): compare_settings(rows, a, b, resamples=resamples) for a, b in spec.comparisons()}
    write_comparisons(out / "comparisons.csv", table)
    return write_report(out, spec, rows, table)


def run_spec(spec: Spec, client: ComfyClient, out: Path, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
             max_runs: int | None = None) -> Summary:
    """Run every unfinished (case, seed, setting) of the spec, then write the comparisons and the report."""
    check_template(spec.workflow)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsCsv(out / "results.csv", spec.max_subjects)
    runs = spec.runs()
    todo = [r for r in runs if r.key not in results.done]
    summary = Summary(total=len(runs), skipped=len(runs) - len(todo))
    if summary.skipped:
        log(f"resuming {out}: {summary.skipped} of {len(runs)} runs already in results.csv, skipped")
    if todo:
        types = {n["class_type"] for n in spec.workflow.values()} | {"LoadImage", SUBJECT, "SaveImage", FIDELITY}
        client.check(types)
    bar = Progress(len(runs), summary.skipped, progress)
    uploaded: dict[str, str] = {}
    try:
        for run in todo[:max_runs]:
            try:
                row = execute(client, spec, run, out, uploaded)
            except ServerError as e:
                summary.failed.append((run.slug, str(e)))
                with (out / "errors.log").open("a", encoding="utf-8") as f:
                    f.write(f"{run.case.id} | {run.setting} | seed {run.seed}: {e}\n")
                bar.step(run, "failed (see errors.log)")
                continue
            results.append(row)
            summary.finished += 1
            bar.step(run, f"{float(row['seconds']):.1f} s")
    finally:
        bar.close()
    summary.report = finish(spec, out)
    return summary
