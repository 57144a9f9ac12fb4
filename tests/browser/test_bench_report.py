"""The benchmark report in Chromium: a 2-case x 2-setting spec run through the real server, then report.html opened
from disk: every output and heat-map image decodes, the score and comparison tables are filled; screenshots saved."""
from __future__ import annotations

from server.test_bench_server import adapter, write_spec  # noqa: F401  (the adapter fixture writes the file)

from comfyui_troupe.evaluation.bench.client import ComfyClient
from comfyui_troupe.evaluation.bench.runner import run_spec
from comfyui_troupe.evaluation.bench.spec import load_spec

WAIT_MS = 90_000  # an upper bound for polled waits (never slept)


def test_report_shows_images_scores_heatmaps_and_the_comparison(page, comfy_server, adapter, tmp_path,  # noqa: F811
                                                                artifacts):
    spec = load_spec(write_spec(tmp_path / "spec", combinations="living_living", per=1, prompts=2))
    out = tmp_path / "out"
    summary = run_spec(spec, ComfyClient(comfy_server.url, timeout=600), out, progress=False, log=lambda m: None)
    assert (summary.finished, summary.failed) == (4, [])

    # a page in its own context of the shared browser; the ComfyUI page stays as it is
    context = page.context.browser.new_context(viewport={"width": 1500, "height": 1000})
    report = context.new_page()
    try:
        report.goto(summary.report.as_uri())
        report.wait_for_function("() => [...document.images].length > 0 && "
                                 "[...document.images].every(i => i.complete && i.naturalWidth > 0)",
                                 timeout=WAIT_MS, polling=250)
        counts = report.evaluate("""() => ({
            outputs: document.querySelectorAll('img.output').length,
            heatmaps: document.querySelectorAll('img.heatmap').length,
            sizes: [...document.querySelectorAll('img.output')].map(i => [i.naturalWidth, i.naturalHeight]),
            heatSizes: [...document.querySelectorAll('img.heatmap')].map(i => i.naturalWidth),
            scoreRows: [...document.querySelectorAll('table.scores')].map(t => t.rows.length),
            cases: [...document.querySelectorAll('section.case')].map(s => s.dataset.case),
            comparison: [...document.querySelectorAll('table.comparison tr')].map(r =>
                [...r.cells].map(c => c.textContent.trim())),
            missing: document.querySelectorAll('.cell.missing').length,
        })""")
        assert counts["outputs"] == 4 and counts["heatmaps"] == 4 and counts["missing"] == 0
        assert all(size == [320, 320] for size in counts["sizes"])  # 128 px outputs drawn at the thumbnail width
        assert all(w > 300 for w in counts["heatSizes"])
        assert counts["scoreRows"] == [3, 3, 3, 3]  # header + two subjects under every image
        assert len(counts["cases"]) == 2 and all(c.startswith("living_living/") for c in counts["cases"])
        header, *rows = counts["comparison"]
        assert header[:2] == ["metric", "n"] and header[-1] == "bootstrap 95% CI"
        assert [r[0] for r in rows] == ["clip_t", "clip_i_mean", "clip_i_margin_mean", "dino_mean", "dino_margin_mean"]
        for r in rows:
            assert r[1] == "2" and r[5].startswith("[") and r[5].endswith("]"), r
        report.screenshot(path=str(artifacts / "bench_report.png"), full_page=False)
        report.locator("div.cell").first.screenshot(path=str(artifacts / "bench_report_cell.png"))
        report.locator("table.comparison").first.screenshot(path=str(artifacts / "bench_report_comparison.png"))
    finally:
        context.close()
