"""``make bench``: every benchmark the README quotes, one markdown table per family, in ``bench-results/``.

Each family runs in its own process, one after the other (never two at once: the machine is shared), and
writes ``bench-results/<family>.md``; ``bench-results/README.md`` gathers them with the command line and the
machine. Within a family the configurations (base, each Troupe setting, each peer) are interleaved in rounds
of sampling runs in one process (see ``bench_common.family_table`` for the columns).

Peers run from checkouts OUTSIDE this repository, given on the command line; a peer whose path is not given
(or not found) is reported as "not run", never estimated:

- ``--peer-ipadapter-plus PATH``: cubiq/ComfyUI_IPAdapter_plus (SDXL);
- ``--peer-instantx PATH``: the InstantX FLUX IP-Adapter port for ComfyUI (Shakker-Labs/ComfyUI-IPAdapter-Flux);
- ``--peer-xflux PATH``: XLabs-AI/x-flux-comfyui (its IP-Adapter with its own sampler);
- ``--peer-site DIR``: an import folder for the peers' own dependencies (the InstantX port imports diffusers);
- ComfyUI's own ``ReferenceLatent`` (FLUX Kontext multi-reference) is part of the host, always run.

Run: ``make bench [QUICK=1] [PEERS="--peer-instantx ..."]`` or
``.host/venv/bin/python scripts/bench_all.py [--quick] [--families sdxl,flux,reference,encoders,train,train-flux]
[peers]``.
``--quick``: reduced sizes and 2 rounds (a few minutes on 2 CPU cores); the full mode takes about an hour and
includes one full-size SDXL UNet run (needs about 14 GB free memory).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("sdxl", "flux", "reference", "encoders", "train", "train-flux")


TITLES = {"encoders": "Encoders: TroupeEncodeSubjects, batched against one forward per subject",
          "train": "Training step: REPA alignment on against off",
          "train-flux": "Training step of the FLUX methods: gradient checkpointing on against off"}


def family_command(name: str, args) -> list[str]:
    """The command line of one family's benchmark: its own script, which prints its table on stdout (progress
    on stderr, or on stdout as ``[bench]`` lines)."""
    py, scripts = sys.executable, ROOT / "scripts"
    quick = ["--quick"] if args.quick else []
    threads = ["--threads", str(args.threads)]
    if name == "sdxl":
        peer = ["--peer", str(args.peer_ipadapter_plus)] if args.peer_ipadapter_plus else []
        return [py, str(scripts / "bench_sdxl.py"), "--family", *quick, *threads, *peer]
    if name == "flux":
        peers = []
        if args.peer_instantx:
            peers += ["--peer-instantx", str(args.peer_instantx)]
        if args.peer_xflux:
            peers += ["--peer-xflux", str(args.peer_xflux)]
        if args.peer_site:
            peers += ["--peer-site", str(args.peer_site)]
        return [py, str(scripts / "bench_flux.py"), "--family", *quick, *threads, *peers]
    if name == "reference":
        return [py, str(scripts / "bench_reference.py"), "--family", *quick, *threads,
                *([] if args.quick else ["--count"])]
    if name == "encoders":
        return [py, str(scripts / "bench_encoding.py"), *threads,
                *(["--skip-full", "--repeats", "2"] if args.quick else [])]
    if name == "train":
        rounds = ["--rounds", "1", "--configs", "off,on"] if args.quick else ["--rounds", "2", "--configs", "off,on",
                                                                            "--gradient-checkpointing",
                                                                            "--optimizer", "sgd"]
        return [py, str(scripts / "bench_train.py"), *quick, *rounds]
    if name == "train-flux":  # quick: width 256, 1 round (about a minute); full: the full-width proxy, 2 rounds
        # (about 40 minutes; aligngen's step, with its 268 M-parameter DEM under AdamW, needs over 10 GB)
        return [py, str(scripts / "bench_train_flux.py"), *quick, *threads, "--rounds", "1" if args.quick else "2"]
    raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes, 2 rounds: a few minutes")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per benchmark (default 1: on shared cores, CPU time then counts work only, not "
                         "threads spinning while they wait for a descheduled sibling)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results", help="results folder (gitignored)")
    ap.add_argument("--peer-ipadapter-plus", type=Path, default=None, help="checkout of cubiq/ComfyUI_IPAdapter_plus")
    ap.add_argument("--peer-instantx", type=Path, default=None,
                    help="checkout of the InstantX FLUX IP-Adapter port (Shakker-Labs/ComfyUI-IPAdapter-Flux)")
    ap.add_argument("--peer-xflux", type=Path, default=None, help="checkout of XLabs-AI/x-flux-comfyui")
    ap.add_argument("--peer-site", type=Path, default=None,
                    help="extra import folder for the peers' own dependencies (the InstantX port imports diffusers: "
                         "pip install --target DIR diffusers==0.31.0)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"--families: unknown {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    for flag in ("peer_ipadapter_plus", "peer_instantx", "peer_xflux"):
        path = getattr(args, flag)
        if path is not None and not path.is_dir():
            print(f"[bench] --{flag.replace('_', '-')}: {path} is not a folder; that peer is reported as not run",
                  file=sys.stderr)
            setattr(args, flag, None)
        elif path is not None and path.resolve().is_relative_to(ROOT):
            ap.error(f"--{flag.replace('_', '-')}: {path} is inside this repository; check the peer out elsewhere")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tables, failed = [], []
    for name in names:
        out = args.out / f"{name}.md"
        cmd = family_command(name, args)
        print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        kept = []
        for line in proc.stdout:  # progress lines go to the terminal, the rest is the table
            if line.startswith("[bench]"):
                print(line, end="", flush=True)
            else:
                kept.append(line)
        rc = proc.wait()
        took = time.perf_counter() - t0
        text = "".join(kept).strip() + "\n"
        if rc != 0:
            failed.append(name)
            text = f"### {name}\n\nfailed (exit {rc}); its output:\n\n```\n{text}```\n"
        elif not text.startswith("### "):
            text = f"### {TITLES.get(name, name)}\n\n{text}"
        out.write_text(text)
        tables.append(text)
        print(f"[bench] {name}: done in {took:.0f} s\n", flush=True)
        print(tables[-1], flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# Benchmark results ({'quick' if args.quick else 'full'} mode)\n\n"
              f"{stamp}; `{' '.join([Path(sys.executable).name, 'scripts/bench_all.py', *(argv or sys.argv[1:])])}`; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
              "no GPU (CPU only, fp32).\n")
    (args.out / "README.md").write_text(header + "\n" + "\n".join(tables))
    print(f"[bench] tables in {args.out}/ ({', '.join(f'{n}.md' for n in names)}, README.md)", flush=True)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
