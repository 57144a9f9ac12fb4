"""Progress of a patch's once-per-run setup (the K/V and masks it computes on the first model call of a run).

The host (``nodes/lifecycle.py``) puts a plain callable under ``RUN_KEY`` in the run dict it hands a patch; the
patch calls ``setup_done(run, point, ...)`` when it has computed the per-run entries of a hook point (an SDXL
attn2 layer, a FLUX block, the reference branch's stream). The reporter counts each point once per run, so
repeated calls cost a dict look-up and report nothing; without a reporter (tests, calls outside a sampling run)
nothing happens. Plain Python: the ComfyUI progress bar behind it lives in ``nodes/``.
"""
from __future__ import annotations

from collections.abc import Hashable

RUN_KEY = "troupe_setup_progress"  # the run dict's key of the reporter: reporter(*points) -> None


def setup_done(run: dict, *points: Hashable) -> None:
    """Tell the run's reporter (if any) that these hook points finished their once-per-run setup."""
    report = run.get(RUN_KEY)
    if report is not None:
        report(*points)
