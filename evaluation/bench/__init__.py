"""The benchmark runner: specs of cases (subjects, layout, prompt, seeds) x settings, run through a ComfyUI server's
API, scored by TroupeFidelity, written to a CSV that resumes, compared with bootstrap intervals, shown as HTML.

Standard library, numpy and PIL only (no torch, no ComfyUI): it runs beside any server. From the pack's folder:
``python -m evaluation.bench --help``.
"""
