"""A benchmark spec: a workflow template, the settings to compare, and the cases (subjects, boxes, prompt, seeds).

    {"version": 1, "name": "...", "workflow": "template.json" (API format, or the graph inline),
     "width": 1024, "height": 1024, "seeds": [0],
     "settings": {"adapter on": {}, "adapter off": {"16.model": ["1", 0]}},   # "<node id>.<input>": value
     "compare": [["adapter off", "adapter on"]],                              # optional: [baseline, other]
     "cases": [{"id": "living_object/dog+teapot/p0", "combination": "living_object",
                "subjects": [{"label": "dog", "image": "images/dog.jpg"}, ...],  # paths: relative to the spec
                "boxes": [[x0, y0, x1, y1], ...], "template": "a {0} and a {1} in a room",
                "prompt": "...", "seeds": [...]}]}                          # prompt, seeds: optional
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SPEC_VERSION = 1
MAX_SUBJECTS = 8


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and says what to write."""


@dataclass(frozen=True)
class SubjectSpec:
    label: str
    image: Path
    weight: float = 1.0


@dataclass(frozen=True)
class Case:
    id: str
    subjects: tuple[SubjectSpec, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    prompt: str
    template: str = ""
    combination: str = ""
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Run:
    """One queued prompt: a case at a seed under a setting."""

    case: Case
    seed: int
    setting: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.case.id, str(self.seed), self.setting

    @property
    def slug(self) -> str:
        return slugify(f"{self.case.id}__{self.setting}__s{self.seed}")


@dataclass(frozen=True)
class Spec:
    name: str
    workflow: dict
    width: int
    height: int
    seeds: tuple[int, ...]
    settings: dict[str, dict]
    cases: tuple[Case, ...]
    compare: tuple[tuple[str, str], ...] = ()
    source: Path | None = field(default=None, compare=False)

    @property
    def max_subjects(self) -> int:
        return max(len(c.subjects) for c in self.cases)

    def runs(self) -> list[Run]:
        """Every (case, seed, setting), case by case: one case's settings run side by side."""
        return [Run(case, seed, setting) for case in self.cases for seed in (case.seeds or self.seeds)
                for setting in self.settings]

    def comparisons(self) -> tuple[tuple[str, str], ...]:
        """The pairs to compare: the spec's, else every setting against the first."""
        if self.compare:
            return self.compare
        names = list(self.settings)
        return tuple((names[0], other) for other in names[1:])


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")[:150]


def _need(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise SpecError(f"{where}: {message}")


def parse_box(value, where: str) -> tuple[float, float, float, float]:
    _need(isinstance(value, (list, tuple)) and len(value) == 4, where, f"expected [x0, y0, x1, y1], got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    _need(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, where,
          f"need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (normalised to the canvas), got {list(value)}")
    return x0, y0, x1, y1


def parse_case(raw: dict, index: int, base: Path) -> Case:
    where = f"cases[{index}]"
    _need(isinstance(raw, dict), where, "expected an object with id, subjects, boxes and prompt or template")
    cid = str(raw.get("id") or "")
    _need(bool(cid), where, "give every case an 'id' (unique, e.g. 'living_object/dog+teapot/p0')")
    where = f"case {cid!r}"
    subjects_raw = raw.get("subjects")
    _need(isinstance(subjects_raw, list) and 1 <= len(subjects_raw) <= MAX_SUBJECTS, where,
          f"'subjects' must list 1..{MAX_SUBJECTS} subjects, each {{\"label\", \"image\"}}")
    subjects = []
    for k, s in enumerate(subjects_raw):
        _need(isinstance(s, dict) and s.get("label") and s.get("image"), f"{where} subject {k + 1}",
              "needs 'label' (the word in the prompt) and 'image' (a path)")
        path = Path(s["image"])
        path = path if path.is_absolute() else (base / path)
        _need(path.is_file(), f"{where} subject {k + 1}", f"image {s['image']!r} not found (looked at {path}); "
              "paths are relative to the spec file")
        subjects.append(SubjectSpec(label=str(s["label"]), image=path.resolve(), weight=float(s.get("weight", 1.0))))
    boxes_raw = raw.get("boxes")
    _need(isinstance(boxes_raw, list) and len(boxes_raw) == len(subjects), where,
          f"'boxes' must hold one [x0, y0, x1, y1] per subject ({len(subjects)}), in subject order")
    boxes = tuple(parse_box(b, f"{where} box {k + 1}") for k, b in enumerate(boxes_raw))
    template = str(raw.get("template") or "")
    prompt = raw.get("prompt")
    if prompt is None:
        _need(bool(template), where, "give a 'prompt', or a 'template' like 'a {0} and a {1} in a room'")
        try:
            prompt = template.format(*[s.label for s in subjects])
        except (IndexError, KeyError) as e:
            raise SpecError(f"{where}: template {template!r} names a subject that is not there ({e}); "
                            f"{len(subjects)} subjects give {{0}}..{{{len(subjects) - 1}}}") from None
    seeds = raw.get("seeds", ())
    _need(isinstance(seeds, (list, tuple)) and all(isinstance(x, int) for x in seeds), where,
          "'seeds' must be a list of integers")
    return Case(id=cid, subjects=tuple(subjects), boxes=boxes, prompt=str(prompt), template=template,
                combination=str(raw.get("combination") or ""), seeds=tuple(seeds))


def load_workflow(value, base: Path) -> dict:
    if isinstance(value, dict):
        graph = value
    else:
        _need(isinstance(value, str) and bool(value), "workflow", "give the path of an API-format workflow (ComfyUI: "
              "Export (API)) or the graph itself")
        path = Path(value) if Path(value).is_absolute() else base / value
        _need(path.is_file(), "workflow", f"{value!r} not found (looked at {path})")
        graph = json.loads(path.read_text(encoding="utf-8"))
    _need(isinstance(graph, dict) and graph and all(isinstance(n, dict) and "class_type" in n for n in graph.values()),
          "workflow", "not an API-format graph ({node id: {class_type, inputs}}); in ComfyUI use Export (API), not "
          "Save (a UI workflow has 'nodes' and 'links')")
    return graph


def parse_spec(raw: dict, base: Path, source: Path | None = None) -> Spec:
    _need(isinstance(raw, dict), "spec", "expected a JSON object with workflow, settings and cases")
    _need(raw.get("version", SPEC_VERSION) == SPEC_VERSION, "version", f"this runner reads version {SPEC_VERSION}")
    workflow = load_workflow(raw.get("workflow"), base)
    width, height = int(raw.get("width", 1024)), int(raw.get("height", 1024))
    _need(width >= 8 and height >= 8, "width/height", "the canvas needs at least 8 pixels each way")
    seeds = raw.get("seeds", [0])
    _need(isinstance(seeds, list) and seeds and all(isinstance(x, int) for x in seeds), "seeds",
          "a non-empty list of integers, e.g. [0, 1, 2]")
    settings = raw.get("settings") or {"default": {}}
    _need(isinstance(settings, dict) and all(isinstance(v, dict) for v in settings.values()), "settings",
          'an object {"name": {"<node id>.<input>": value}}; {} runs the workflow as it is')
    for name, overrides in settings.items():
        for target in overrides:
            node, _, inp = str(target).partition(".")
            _need(node in workflow and bool(inp), f"settings[{name!r}]",
                  f"{target!r} is not '<node id>.<input>' of a node in the workflow (ids: {', '.join(workflow)})")
    cases_raw = raw.get("cases")
    _need(isinstance(cases_raw, list) and cases_raw, "cases", "a non-empty list of cases")
    cases = tuple(parse_case(c, i, base) for i, c in enumerate(cases_raw))
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    _need(not dup, "cases", f"case ids must be unique; repeated: {', '.join(dup)}")
    compare = []
    for pair in raw.get("compare") or []:
        _need(isinstance(pair, list) and len(pair) == 2 and all(p in settings for p in pair), "compare",
              f"each entry is [baseline, other], two setting names of {list(settings)}; got {pair!r}")
        compare.append((pair[0], pair[1]))
    return Spec(name=str(raw.get("name") or (source.stem if source else "benchmark")), workflow=workflow,
                width=width, height=height, seeds=tuple(seeds), settings=dict(settings), cases=cases,
                compare=tuple(compare), source=source)


def load_spec(path: str | os.PathLike) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec: {path} not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpecError(f"spec: {path} is not valid JSON ({e})") from None
    return parse_spec(raw, path.resolve().parent, path.resolve())
