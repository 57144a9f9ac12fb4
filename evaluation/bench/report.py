"""The HTML report: one self-contained file (images inlined) with the outputs per case and setting (boxes drawn),
per-subject scores under each image, the leakage heat-maps and the comparison table with confidence intervals."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..stats import Difference
from .results import SUBJECT_FIELDS

# models/layout/layout.py PALETTE (subject i's colour everywhere in the pack; a unit test keeps them equal)
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
THUMB = 320
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px} h2{font-size:17px;margin-top:28px} .prompt{color:#555;font-style:italic}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#17751a;font-weight:600} .neg{color:#b3261e;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.cell{background:#fff;border:1px solid #ddd;padding:8px;width:fit-content;max-width:680px}
.cell h3{font-size:14px;margin:0 0 6px} img.output{width:320px;display:block} img.heatmap{max-width:660px;display:block}
.meta{color:#666;font-size:12px}
"""


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def with_boxes(path: Path, boxes, labels) -> Image.Image:
    """The output image scaled to the thumbnail width, each subject's box drawn in its colour with its number."""
    img = Image.open(path).convert("RGB")
    scale = THUMB / img.width
    img = img.resize((THUMB, max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    d = ImageDraw.Draw(img)
    font = _font(14)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = box[0] * img.width, box[1] * img.height, box[2] * img.width - 1, box[3] * img.height - 1
        d.rectangle((x0, y0, x1, y1), outline=colour, width=3)
        d.rectangle((x0, y0, x0 + 8 + 8 * len(f"{i + 1} {label}"), y0 + 18), fill=colour)
        d.text((x0 + 4, y0 + 2), f"{i + 1} {label}", fill="white", font=font)
    return img


def fmt(x: str | float | None, digits: int = 4) -> str:
    if x in (None, ""):
        return "-"
    return f"{float(x):.{digits}f}"


def signed(x: float) -> str:
    """A difference: 4 decimals, or 3 significant digits when it is smaller than that."""
    return f"{x:+.2e}" if x != 0 and abs(x) < 5e-5 else f"{x:+.4f}"


def comparison_html(table: dict[tuple[str, str], list[Difference]]) -> str:
    if not table:
        return "<p>One setting only: nothing to compare.</p>"
    parts = []
    for (a, b), diffs in table.items():
        rows = []
        for d in diffs:
            cls = ("pos" if d.low > 0 else "neg") if d.significant else ""
            ci = "-" if d.n == 0 else f"[{signed(d.low)}, {signed(d.high)}]"
            diff = "-" if d.n == 0 else signed(d.mean_diff)
            rows.append(f"<tr><td>{html.escape(d.metric)}</td><td class=num>{d.n}</td>"
                        f"<td class=num>{fmt(d.mean_a, 4) if d.n else '-'}</td>"
                        f"<td class=num>{fmt(d.mean_b, 4) if d.n else '-'}</td>"
                        f"<td class='num {cls}'>{diff}</td><td class='num {cls}'>{ci}</td></tr>")
        parts.append(f"<h3>{html.escape(b)} vs {html.escape(a)} (difference: {html.escape(b)} minus "
                     f"{html.escape(a)}, paired by case and seed)</h3>"
                     f"<table class=comparison data-baseline='{html.escape(a)}' data-setting='{html.escape(b)}'>"
                     "<tr><th>metric</th><th>n</th><th>mean " + html.escape(a) + "</th><th>mean " + html.escape(b) +
                     "</th><th>mean difference</th><th>bootstrap 95% CI</th></tr>" + "".join(rows) + "</table>")
    return "\n".join(parts)


def scores_html(row: dict) -> str:
    n = int(row.get("n_subjects") or 0)
    head = "<tr><th>#</th><th>subject</th><th>CLIP-I</th><th>DINO</th><th>margin CLIP-I</th><th>margin DINO</th></tr>"
    body = []
    for k in range(1, n + 1):
        colour = PALETTE[(k - 1) % len(PALETTE)]
        g = {f: row.get(f"s{k}_{f}", "") for f in SUBJECT_FIELDS}
        margins = []
        for f in ("clip_i_margin", "dino_margin"):
            cls = "" if g[f] in ("", None) else ("pos" if float(g[f]) > 0 else "neg")
            margins.append(f"<td class='num {cls}'>{fmt(g[f])}</td>")
        body.append(f"<tr><td style='color:{colour}'>{k}</td><td>{html.escape(g['label'] or '')}</td>"
                    f"<td class=num>{fmt(g['clip_i'])}</td><td class=num>{fmt(g['dino'])}</td>{''.join(margins)}</tr>")
    return (f"<table class=scores>{head}{''.join(body)}</table>"
            f"<div class=meta>CLIP-T {fmt(row.get('clip_t'), 4)}</div>")


def write_report(out: Path, spec, rows: list[dict], table: dict[tuple[str, str], list[Difference]]) -> Path:
    """report.html in ``out`` from the CSV rows (paths inside are relative to ``out``)."""
    by_key = {(r["case"], r["seed"], r["setting"]): r for r in rows}
    settings = list(spec.settings)
    backbones = next((r for r in rows), {})
    meta = (f"{len(rows)} runs of {len(spec.runs())}; {len(spec.cases)} cases x seeds x {len(settings)} settings "
            f"({', '.join(settings)}). Backbones: CLIP image {backbones.get('clip_image') or '-'}; CLIP text "
            f"{backbones.get('clip_text') or '-'}; DINO {backbones.get('dino_backbone') or '-'}; crop "
            f"{backbones.get('crop') or '-'}.")
    head = f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(spec.name)}</title><style>{CSS}</style>"
    parts = [head + "</head><body>",
             f"<h1>Troupe benchmark: {html.escape(spec.name)}</h1>",
             f"<p class=meta>{html.escape(meta)}</p>",
             "<h2>Comparison</h2>", comparison_html(table), "<h2>Cases</h2>"]
    for case in spec.cases:
        labels = [s.label for s in case.subjects]
        parts.append(f"<section class=case data-case='{html.escape(case.id)}'><h2>{html.escape(case.id)}</h2>"
                     f"<p class=prompt>{html.escape(case.prompt)}</p><div class=grid>")
        for seed in case.seeds or spec.seeds:
            for setting in settings:
                row = by_key.get((case.id, str(seed), setting))
                title = f"{html.escape(setting)}, seed {seed}"
                if row is None:
                    parts.append(f"<div class='cell missing'><h3>{title}</h3><p>not run yet</p></div>")
                    continue
                img = data_uri(with_boxes(out / row["image"], case.boxes, labels))
                heat = data_uri(Image.open(out / row["heatmap"]).convert("RGB"))
                parts.append(f"<div class=cell><h3>{title}</h3>"
                             f"<img class=output alt='{html.escape(case.id)} {title}' src='{img}' "
                             f"data-setting='{html.escape(setting)}' data-seed='{seed}'>"
                             f"{scores_html(row)}<details open><summary>leakage heat-map (rows: regions of this image, columns: subjects)</summary>"
                             f"<img class=heatmap alt='heat-map {title}' src='{heat}'></details></div>")
        parts.append("</div></section>")
    parts.append(f"<p class=meta>spec: {html.escape(json.dumps(str(spec.source) if spec.source else ''))}</p>"
                 "</body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
