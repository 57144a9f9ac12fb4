"""Benchmark (not a test): TroupeEncodeSubjects time for 1, 2, 4, 8 subjects, batched vs one forward per subject.

Architectures: the tiny 24-layer test tower (width 64, 224 px) and the full-size ViT-L/14-336 (ComfyUI's own
``clip_vision_config_vitl_336.json``: 24 layers, width 1024, 577 tokens) with random weights, on MS-Bench photos.
Prints a markdown table; per-subject time must not grow with the subject count (one batched forward).

    .host/venv/bin/python scripts/bench_encoding.py [--repeats 3] [--threads 2] [--skip-full]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: F401  (registers the pack as comfyui_troupe)
import numpy as np
import torch
from fixtures.tiny_models import ensure_comfy, init_weights, tiny_clip_vision
from PIL import Image

MSBENCH = ROOT / "benchmarks" / "msbench" / "images"


def photos(n: int) -> list[torch.Tensor]:
    files = sorted(p for p in MSBENCH.rglob("*.jpg"))[:n]
    return [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)[None] for f in files]


def full_vitl336(seed: int = 0):
    import comfy.clip_vision

    config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_vitl_336.json")
    cv = comfy.clip_vision.ClipVisionModel(str(config))
    init_weights(cv.model, seed)
    return cv


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, cv, counts, repeats: int) -> list[str]:
    from comfyui_troupe.models.layout.subject import Subject
    from comfyui_troupe.nodes.encoding import encode_subjects

    images = photos(max(counts))
    rows = []
    for n in counts:
        subjects = tuple(Subject(image=images[i], label=f"s{i + 1}") for i in range(n))
        batched = timed(lambda subjects=subjects: encode_subjects(cv, subjects), repeats)
        single = timed(lambda subjects=subjects: [encode_subjects(cv, (s,)) for s in subjects], repeats)
        rows.append(f"| {name} | {n} | {batched * 1000:.1f} | {batched / n * 1000:.1f} | {single / n * 1000:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--skip-full", action="store_true", help="only the tiny tower")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_comfy()
    counts = (1, 2, 4, 8)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, fp32 (ComfyUI keeps CLIP vision in fp16 "
          f"on CPU and casts per layer), median of {args.repeats}")
    print("| encoder | subjects | batched total (ms) | batched per subject (ms) | one forward per subject, per "
          "subject (ms) |")
    print("| --- | --- | --- | --- | --- |")
    bench("tiny ViT-L/14 shape (24 x 64, 224 px)", tiny_clip_vision(24), counts, args.repeats)
    if not args.skip_full:
        with torch.inference_mode():
            cv = full_vitl336()
        bench("ViT-L/14-336 (24 x 1024, 336 px)", cv, counts, max(1, args.repeats - 2))


if __name__ == "__main__":
    main()
