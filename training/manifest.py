"""The training dataset: a folder of images and a JSONL manifest, one record (target image + subjects) per line.

    {"image": "images/0001.jpg", "caption": "a dog and a teapot on a table",
     "subjects": [{"label": "dog", "box": [0.05, 0.3, 0.45, 0.95], "mask": "masks/0001_dog.png",
                   "references": ["refs/dog.jpg"]},
                  {"label": "teapot", "box": [0.5, 0.4, 0.9, 0.9], "references": "crop"}],
     "kind": "intra"}

- paths are relative to the manifest's folder (absolute paths are kept);
- ``box``: normalised ``[x0, y0, x1, y1]`` like TROUPE_LAYOUT (or ``{"x0":.., "y0":.., "x1":.., "y1":..}``);
- ``references``: reference photos of the subject, or ``"crop"``: crop the target at the box (DynaIP's
  single-subject data);
- ``kind``: ``"intra"`` (references cut from the target) or ``"cross"`` (references from other photos of the
  subject), DynaIP's intra-/cross-pair data; ``meta``: free-form, ignored.
- ``correspondences`` (per subject, optional): ``[[ref_x, ref_y, target_x, target_y], ...]``, normalised points of
  the subject's first reference (or its crop) and of the target that show the same part (MOSAIC's correspondence
  loss; ``troupe_train.py correspond`` proposes them as pseudo-labels).
- ``parent_class`` and ``category`` (per subject, optional): a parent class ("guitar") and a broader category
  ("musical instrument") of the subject's label ("acoustic guitar"); AlignGen's random concept-name substitution
  ("Training Strategy") replaces the label in the caption by one of them with ``method.concept_substitution``.

``read_manifest`` reports every problem of a file at once, each as ``manifest.jsonl line 7: ...``.
The format for users is in docs/training-data.md.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.layout.layout import MAX_REGIONS, LayoutError, validate_box

LOG = logging.getLogger(__name__)

MAX_SUBJECTS = MAX_REGIONS  # 8: the layout's limit, so every training record fits a TROUPE_LAYOUT
KINDS = ("intra", "cross")
CROP = "crop"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
RECORD_FIELDS = ("image", "caption", "subjects", "kind", "meta", "loser", "scores")
SUBJECT_FIELDS = ("label", "box", "mask", "references", "correspondences", "parent_class", "category")
Correspondence = tuple[float, float, float, float]  # (ref_x, ref_y, target_x, target_y), normalised
Box = tuple[float, float, float, float]


class ManifestError(ValueError):
    """A manifest with problems; ``problems`` holds every one as (line, message), line 0 for the file itself."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.path = Path(path)
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = "\n".join(f"  {where(self.path, line)}: {msg}" for line, msg in self.problems)
        super().__init__(f"{self.path}: {count}; fix them and run the validator again:\n{lines}")


def where(path: Path, line: int) -> str:
    """How a problem's place is written: ``manifest.jsonl line 7`` (or the file name alone for line 0)."""
    return f"{Path(path).name} line {line}" if line else Path(path).name


def label_in_caption(label: str, caption: str) -> bool:
    """Whether label occurs in caption as a whole word or phrase, case-insensitive ("dog" is not in "dogs")."""
    words = label.split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SubjectRecord:
    """One subject of a record: its word in the caption, its box, an optional mask and its reference photos."""

    label: str
    box: Box
    mask: Path | None
    references: tuple[Path, ...]  # empty: crop the target at the box ("crop" in the manifest)
    correspondences: tuple[Correspondence, ...] = ()  # points of the first reference -> the target (mosaic)
    parent_class: str = ""  # aligngen: a parent class of the label ("guitar" for "acoustic guitar"), "" = none
    category: str = ""  # aligngen: a broader category ("musical instrument"), "" = none

    @property
    def crop_from_target(self) -> bool:
        """The reference is the target cropped at the box (DynaIP's single-subject data)."""
        return not self.references


@dataclass(frozen=True)
class Record:
    """One manifest line: the target image, its caption and its 1 to 8 subjects; kind is "intra" or "cross"."""

    line: int
    image: Path
    caption: str
    subjects: tuple[SubjectRecord, ...]
    kind: str = "intra"
    loser: Path | None = None  # a preference pair (FocusDPO): ``image`` is the winner, this the loser
    scores: tuple[float, float] | None = None  # (winner, loser) reward scores, when the pair was scored


# --------------------------------------------------------------------------- parsing one line


def _unknown(key: str, known: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return f'unknown {what} "{key}"; {hint}the known {what}s are {", ".join(known)}'


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _box(value: Any, at: str) -> tuple[Box | None, str | None]:
    if isinstance(value, dict):
        missing = [k for k in ("x0", "y0", "x1", "y1") if k not in value]
        extra = sorted(set(value) - {"x0", "y0", "x1", "y1"})
        if missing or extra:
            return None, (f'{at}: the dict form needs exactly "x0", "y0", "x1", "y1"'
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(extra)}" if extra else ""))
        value = [value["x0"], value["y0"], value["x1"], value["y1"]]
    try:
        return validate_box(value, at), None
    except LayoutError as e:
        return None, str(e)


FileRef = tuple[str, Path, str]  # (how a problem names it, path, role: "image", "mask" or "reference")


def _subject(item: Any, at: str, caption: str | None, base: Path, problems: list[str],
             files: list[FileRef]) -> SubjectRecord | None:
    """Parse one subject object, appending its problems and the files it names; None when it has problems."""
    if not isinstance(item, dict):
        problems.append(f"{at}: expected an object with label, box and references, got {json.dumps(item)}")
        return None
    before = len(problems)
    problems.extend(f"{at}: " + _unknown(k, SUBJECT_FIELDS, "subject field") for k in item if k not in SUBJECT_FIELDS)
    label = item.get("label")
    if not isinstance(label, str) or not label.strip():
        problems.append(f'{at}: "label" must be the word that names the subject in the caption, got '
                        f"{json.dumps(label) if 'label' in item else 'nothing'}")
    elif isinstance(caption, str) and not label_in_caption(label, caption):
        problems.append(f'{at}: label "{label}" is not in the caption as a whole word (case-insensitive); '
                        f"use the caption's own word for the subject or add it to the caption")
    box = None
    if "box" not in item:
        problems.append(f'{at}: "box" is missing; give [x0, y0, x1, y1] as fractions of the image')
    else:
        box, problem = _box(item["box"], f"{at} box")
        if problem:
            problems.append(problem)
    mask = item.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask):
        problems.append(f'{at}: "mask" must be a path to a mask image (or left out), got {json.dumps(mask)}')
    elif mask:
        files.append((f"{at} mask", _path(base, mask), "mask"))
    refs = item.get("references")
    if isinstance(refs, list):
        files.extend((f"{at} reference", _path(base, r), "reference") for r in refs if isinstance(r, str) and r)
    if refs == CROP:
        references: tuple[Path, ...] = ()
    elif isinstance(refs, list) and refs and all(isinstance(r, str) and r for r in refs):
        references = tuple(_path(base, r) for r in refs)
    else:
        references = ()
        got = json.dumps(refs) if "references" in item else "nothing"
        problems.append(f'{at}: "references" must be a non-empty list of image paths or "crop" (crop the target '
                        f"at the box), got {got}")
    pairs = _correspondences(item.get("correspondences", []), at, problems)
    names = {}
    for key in ("parent_class", "category"):  # aligngen's concept-name substitution ("Training Strategy")
        value = item.get(key, "")
        if not isinstance(value, str) or (key in item and not value.strip()):
            problems.append(f'{at}: "{key}" must be a word or phrase that could stand for the subject in the caption '
                            f'(e.g. "guitar" for "acoustic guitar"), or be left out; got {json.dumps(value)}')
        else:
            names[key] = value.strip()
    if len(problems) > before:
        return None
    return SubjectRecord(label=label.strip(), box=box, mask=_path(base, mask) if mask else None,
                         references=references, correspondences=pairs, **names)


def _correspondences(value: Any, at: str, problems: list[str]) -> tuple[Correspondence, ...]:
    """The optional ``correspondences`` of a subject: [ref_x, ref_y, target_x, target_y] lists, each number a
    fraction in [0, 1] of its image (the subject's first reference, the target); MOSAIC's correspondence loss."""
    def point(p: Any) -> bool:
        return (isinstance(p, list) and len(p) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in p))

    if not isinstance(value, list):
        problems.append(f'{at}: "correspondences" must be a list of [ref_x, ref_y, target_x, target_y] lists, got '
                        f"{json.dumps(value)}")
        return ()
    bad = [i + 1 for i, p in enumerate(value) if not point(p)]
    if bad:
        problems.append(f'{at}: "correspondences" entry {", ".join(map(str, bad[:5]))}'
                        + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
                        + f" is not [ref_x, ref_y, target_x, target_y] with numbers in [0, 1] (fractions of the "
                        f"reference and the target image), got {json.dumps(value[bad[0] - 1])}")
        return ()
    return tuple(tuple(float(v) for v in p) for p in value)


def _record(text: str, line: int, base: Path) -> tuple[Record | None, list[str], list[FileRef]]:
    """Parse one non-blank manifest line: (the Record or None, its problems, the files it names to check)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"], []
    except RecursionError:
        return None, ["not valid JSON (nested too deeply); each line must be one JSON object"], []
    if not isinstance(data, dict):
        return None, ['expected a JSON object {"image": .., "caption": .., "subjects": [..]}, '
                      + f"got {type(data).__name__}"], []
    problems = [_unknown(k, RECORD_FIELDS, "field") for k in data if k not in RECORD_FIELDS]
    files: list[FileRef] = []
    image, caption, subjects = data.get("image"), data.get("caption"), data.get("subjects")
    if not isinstance(image, str) or not image:
        problems.append(f'"image" must be the path of the target image, got '
                        f"{json.dumps(image) if 'image' in data else 'nothing'}")
    else:
        files.append(("image", _path(base, image), "image"))
    if not isinstance(caption, str) or not caption.strip():
        problems.append(f'"caption" must be a non-empty string, got '
                        f"{json.dumps(caption) if 'caption' in data else 'nothing'}")
    kind = data.get("kind", "intra")
    if kind not in KINDS:
        problems.append(f'unknown kind {json.dumps(kind)}; use "intra" (references cut from this image) or '
                        f'"cross" (references from other photos of the subject)')
    parsed: list[SubjectRecord | None] = []
    if not isinstance(subjects, list):
        problems.append(f'"subjects" must be a list of 1 to {MAX_SUBJECTS} subject objects, got '
                        f"{json.dumps(subjects) if 'subjects' in data else 'nothing'}")
    elif not subjects:
        problems.append(f'no subjects: "subjects" is empty; give 1 to {MAX_SUBJECTS} subjects or drop the line')
    elif len(subjects) > MAX_SUBJECTS:
        problems.append(f"{len(subjects)} subjects; at most {MAX_SUBJECTS} per record (the layout's limit): "
                        f"split the record or drop subjects")
    else:
        parsed = [_subject(s, f"subject {i + 1}", caption if isinstance(caption, str) else None, base, problems,
                           files) for i, s in enumerate(subjects)]
        if kind == "cross":
            crops = [i + 1 for i, s in enumerate(subjects) if isinstance(s, dict) and s.get("references") == CROP]
            if crops:
                problems.append(f'kind "cross" but subject {", ".join(map(str, crops))} uses "crop": a cross-pair '
                                f'record takes references from other photos; list them or set kind "intra"')
    loser, scores = data.get("loser"), data.get("scores")
    if "loser" in data:
        if not isinstance(loser, str) or not loser:
            problems.append(f'"loser" must be the path of the less preferred image of a preference pair, got '
                            f"{json.dumps(loser)}")
        else:
            files.append(("loser", _path(base, loser), "image"))
    if "scores" in data:
        if "loser" not in data:
            problems.append('"scores" belongs to a preference pair: give "loser" too, or drop "scores"')
        elif (not isinstance(scores, list) or len(scores) != 2
              or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores)):
            problems.append(f'"scores" must be [winner score, loser score] (two finite numbers), got {json.dumps(scores)}')
    if problems:
        return None, problems, files
    record = Record(line=line, image=_path(base, image), caption=caption, subjects=tuple(parsed), kind=kind,
                    loser=_path(base, loser) if isinstance(loser, str) else None,
                    scores=tuple(float(v) for v in scores) if isinstance(scores, list) else None)
    return record, [], files


# --------------------------------------------------------------------------- files


def _probe(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Open an image with PIL and check it decodes: (width, height) or a problem. JPEGs decode at 1/8 scale."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return None, "file not found"
    if not path.is_file():
        return None, "not a file"
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
            elif im.format == "PNG":
                im.verify()
            else:
                im.load()
        return size, None
    except UnidentifiedImageError:
        return None, "not an image PIL can read"
    except Image.DecompressionBombError as e:
        return None, f"too large to open safely ({e})"
    except (OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable image ({e})"


def _probe_all(paths: list[Path]) -> dict[Path, tuple[tuple[int, int] | None, str | None]]:
    """Probe each distinct file once, in threads (PIL decodes without the GIL)."""
    unique = list(dict.fromkeys(paths))
    if len(unique) < 16:
        return {p: _probe(p) for p in unique}
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(_probe, unique)))


def _file_problems(files: list[FileRef], probed: dict, base: Path) -> list[str]:
    """The problems of one line's files: missing, unreadable, or a mask whose size is not the image's."""
    def show(p: Path) -> str:
        try:
            return str(p.relative_to(base))
        except ValueError:
            return str(p)

    problems = []
    image_size = next((probed[path][0] for _, path, role in files if role == "image"), None)
    for name, path, role in files:
        size, problem = probed[path]
        if problem:
            problems.append(f"{name} {show(path)}: {problem}")
        elif role == "mask" and image_size is not None and size != image_size:
            problems.append(f"{name} {show(path)} is {size[0]}x{size[1]} but the image is "
                            f"{image_size[0]}x{image_size[1]}; save the mask at the image's size")
    return problems


# --------------------------------------------------------------------------- reading and validating


@dataclass
class ValidationReport:
    """What ``validate_manifest`` found: the good records, every problem, each good record's image size."""

    path: Path
    records: list[Record]
    problems: list[tuple[int, str]]
    sizes: list[tuple[int, int] | None] = field(default_factory=list)  # per record: target (width, height)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """Counts for a person: records, subjects per record, target resolutions (top 10), kinds, problems."""
        n = len(self.records)
        p = len(self.problems)
        lines = [f"{self.path.name}: {n} record{'s' if n != 1 else ''}, {p} problem{'s' if p != 1 else ''}"]
        per = Counter(len(r.subjects) for r in self.records)
        lines.append("subjects per record: " + (", ".join(f"{k}: {per[k]}" for k in sorted(per)) or "-"))
        sizes = Counter(f"{w}x{h}" for w, h in (s for s in self.sizes if s is not None))
        top = sizes.most_common(10)
        more = f" (top 10 of {len(sizes)})" if len(sizes) > 10 else ""
        lines.append(f"target resolutions{more}: " + (", ".join(f"{k}: {v}" for k, v in top) or "-"))
        kinds = Counter(r.kind for r in self.records)
        lines.append("kinds: " + (", ".join(f"{k}: {kinds[k]}" for k in KINDS if kinds[k]) or "-"))
        crops = sum(s.crop_from_target for r in self.records for s in r.subjects)
        total = sum(len(r.subjects) for r in self.records)
        lines.append(f"references: {total - crops} subjects with reference photos, {crops} cropped from the target")
        if self.problems:
            lines.append("problems:")
            lines.extend(f"  {where(self.path, line)}: {msg}" for line, msg in self.problems)
        else:
            lines.append("problems: none")
        return "\n".join(lines)


def _scan(path: Path, check_files: bool) -> ValidationReport:
    path = Path(path)
    if not path.is_file():
        return ValidationReport(path, [], [(0, f"manifest not found at {path}; give the path of a .jsonl file")])
    base = path.parent.absolute()
    problems: list[tuple[int, str]] = []
    parsed: list[Record] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return ValidationReport(path, [], [(0, f"not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")])
    seen: dict[tuple, int] = {}
    files: dict[int, list[FileRef]] = {}  # per line; a duplicate line's files are not checked twice
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        record, found, files[line] = _record(raw, line, base)
        problems.extend((line, msg) for msg in found)
        if record is None:
            continue
        key = (record.image, tuple(record.subjects), record.loser)  # one winner may meet several losers
        if key in seen:
            same = "same images" if record.loser else "same image"
            problems.append((line, f"duplicate of line {seen[key]} ({same} and same subjects); drop one"))
            files[line] = []
            continue
        seen[key] = line
        parsed.append(record)
    if not files and not problems:
        problems.append((0, "no records: the manifest is empty; write one JSON object per line"))
    sizes: list[tuple[int, int] | None] = [None] * len(parsed)
    if check_files:
        probed = _probe_all([path for refs in files.values() for _, path, _ in refs])
        bad_lines = set()
        for line, refs in files.items():
            found = _file_problems(refs, probed, base)
            problems.extend((line, msg) for msg in found)
            bad_lines.update([line] if found else [])
        parsed = [r for r in parsed if r.line not in bad_lines]
        sizes = [probed[r.image][0] for r in parsed]
    problems.sort(key=lambda p: p[0])
    return ValidationReport(path, parsed, problems, sizes)


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> list[Record]:
    """Read a manifest; raise ManifestError listing every problem (files are opened unless check_files=False)."""
    report = _scan(Path(path), check_files)
    if report.problems:
        raise ManifestError(report.path, report.problems)
    return report.records


def validate_manifest(path: str | os.PathLike) -> ValidationReport:
    """Read a manifest and open every file it names; the report's ``summary()`` is the validator's output."""
    return _scan(Path(path), check_files=True)


# --------------------------------------------------------------------------- building from a folder


def _mask_box(mask_path: Path) -> Box | None:
    """The normalised bounding box of a mask's pixels > 127, or None when none are."""
    from PIL import Image

    with Image.open(mask_path) as im:
        gray = im.convert("L")
        bbox = gray.point(lambda v: 255 if v > 127 else 0).getbbox()
        w, h = gray.size
    if bbox is None:
        return None
    x0, y0, x1, y1 = bbox
    return (x0 / w, y0 / h, x1 / w, y1 / h)


def _relative(path: Path, start: Path) -> str:
    """path written relative to start (with ``..`` when needed), "/" separated."""
    return Path(os.path.relpath(path.absolute(), start.absolute())).as_posix()


def build_manifest(folder: str | os.PathLike, out: str | os.PathLike, label: str | None = None) -> int:
    """Write a manifest of single-subject records from ``name.jpg|png|webp`` + ``name.txt`` captions; return the count.

    The box comes from ``name.json`` (``{"label": .., "box": [..]}``), else the mask ``name_mask.png`` (pixels > 127),
    else the whole image; the label from the json, else ``label``. References are "crop". Skipped images are logged.
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the folder that holds the images and their .txt captions")
    images = sorted(p for p in folder.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.stem.endswith("_mask"))
    lines = []
    for image in images:
        def skip(why: str, name: str = image.name) -> None:
            LOG.warning("skipped %s: %s", name, why)

        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            skip(f"no caption file {caption_file.name}")
            continue
        caption = " ".join(caption_file.read_text(encoding="utf-8").split())
        if not caption:
            skip(f"{caption_file.name} is empty")
            continue
        name, box = label, None
        sidecar, mask = image.with_suffix(".json"), image.with_name(image.stem + "_mask.png")
        if sidecar.is_file():
            try:
                data = json.loads(sidecar.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                skip(f"{sidecar.name} is not valid JSON ({e})")
                continue
            if not isinstance(data, dict):
                skip(f'{sidecar.name} must be an object {{"label": .., "box": [..]}}')
                continue
            name = data.get("label", label)
            if "box" in data:
                box, problem = _box(data["box"], f"{sidecar.name} box")
                if problem:
                    skip(problem)
                    continue
        if box is None and mask.is_file():
            try:
                box = _mask_box(mask)
            except OSError as e:
                skip(f"mask {mask.name} is unreadable ({e})")
                continue
            if box is None:
                skip(f"mask {mask.name} is empty (no pixel > 127)")
                continue
        if not isinstance(name, str) or not name.strip():
            skip(f'no label: give "label" in {sidecar.name} or pass a label word')
            continue
        if not label_in_caption(name, caption):
            skip(f'label "{name}" is not in the caption "{caption}" as a whole word')
            continue
        box = box or (0.0, 0.0, 1.0, 1.0)
        subject = {"label": name.strip(), "box": [round(v, 6) for v in box], "references": CROP}
        lines.append(json.dumps({"image": _relative(image, out.parent), "caption": caption,
                                 "subjects": [subject], "kind": "intra"}, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
