"""``python -m evaluation.bench``: run a spec, generate MS-Bench / DynaIP specs, rebuild the report, write FocusDPO
preference pairs from a run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .client import ComfyClient, ServerError
from .generators import GENERATORS
from .pairs import DEFAULT_WEIGHTS, MODES, parse_weights, write_pairs
from .runner import finish, run_spec
from .spec import SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a spec through a ComfyUI server; resumes when --out already has results")
    r.add_argument("spec", type=Path)
    r.add_argument("--out", type=Path, required=True, help="output folder (results.csv, images, report.html)")
    r.add_argument("--server", default="http://127.0.0.1:8188", help="the ComfyUI server's URL")
    r.add_argument("--timeout", type=float, default=1800.0, help="seconds one prompt may take")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resume later)")
    rep = sub.add_parser("report", help="rebuild comparisons.csv and report.html from an output folder")
    rep.add_argument("spec", type=Path)
    rep.add_argument("--out", type=Path, required=True)
    pr = sub.add_parser("pairs", help="FocusDPO preference pairs (pairs.jsonl, a training manifest) from a run's scores: "
                                      "per case, its images (one per seed) ranked by a weighted reward")
    pr.add_argument("spec", type=Path)
    pr.add_argument("--out", type=Path, required=True, help="the run's output folder (results.csv); pairs.jsonl goes there")
    pr.add_argument("--weights", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_WEIGHTS.items()),
                    help="reward = sum of metric x weight over the per-image metrics (default: %(default)s)")
    pr.add_argument("--setting", default=None, help="only this setting's images (default: every setting, apart)")
    pr.add_argument("--mode", choices=MODES, default="best-worst",
                    help="best-worst: one pair per case and setting; all: every pair of its images")
    pr.add_argument("--min-gap", type=float, default=0.0, help="skip pairs whose rewards differ by less than this")
    for name, (generate, add_args, help_text) in GENERATORS.items():
        g = sub.add_parser(name, help=help_text)
        g.add_argument("--workflow", required=True, help="API-format workflow template (path, as the spec will "
                                                         "refer to it: relative to the spec file)")
        g.add_argument("--spec", type=Path, required=True, help="where to write the spec")
        g.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
        g.add_argument("--settings", default=None,
                       help='JSON object of settings, e.g. \'{"on": {}, "off": {"16.model": ["1", 0]}}\'')
        g.add_argument("--width", type=int, default=1024)
        g.add_argument("--height", type=int, default=1024)
        add_args(g)
        g.set_defaults(generate=generate)
    args = ap.parse_args(argv)
    try:
        if args.command == "run":
            spec = load_spec(args.spec)
            summary = run_spec(spec, ComfyClient(args.server, timeout=args.timeout), args.out,
                               progress=not args.no_progress, max_runs=args.max_runs)
            print(f"{summary.finished} runs finished, {summary.skipped} skipped (already done), "
                  f"{len(summary.failed)} failed; report: {summary.report}")
            return 1 if summary.failed else 0
        if args.command == "pairs":
            path, n = write_pairs(load_spec(args.spec), args.out, weights=parse_weights(args.weights),
                                  setting=args.setting, min_gap=args.min_gap, mode=args.mode)
            print(f"{path}: {n} preference pairs; check them with troupe_train.py validate {path}")
            return 0
        if args.command == "report":
            print(finish(load_spec(args.spec), args.out))
            return 0
        spec = args.generate(args)
        spec["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        spec["width"], spec["height"] = args.width, args.height
        spec["workflow"] = args.workflow
        if args.settings:
            spec["settings"] = json.loads(args.settings)
        args.spec.parent.mkdir(parents=True, exist_ok=True)
        args.spec.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        print(f"{args.spec}: {len(spec['cases'])} cases")
        return 0
    except (SpecError, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
