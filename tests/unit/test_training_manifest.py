"""training.manifest: the JSONL dataset format; every problem of a file is reported at once with its line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from comfyui_troupe.training.manifest import (
    MAX_SUBJECTS,
    ManifestError,
    Record,
    SubjectRecord,
    build_manifest,
    label_in_caption,
    read_manifest,
    validate_manifest,
)


def _image(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 255).save(path)
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A dataset folder: two targets (64x48 and 32x32), masks, reference photos, and broken files."""
    root = tmp_path / "data"
    _image(root / "images" / "0001.jpg")
    _image(root / "images" / "0002.png", size=(32, 32))
    _image(root / "masks" / "0001_dog.png", mode="L")
    _image(root / "masks" / "small.png", size=(8, 8), mode="L")
    _image(root / "refs" / "dog.jpg", size=(20, 20))
    _image(root / "refs" / "cat.webp", size=(20, 20))
    (root / "refs" / "broken.jpg").write_bytes(b"this is not a jpeg")
    png = (root / "images" / "0002.png").read_bytes()
    (root / "refs" / "truncated.png").write_bytes(png[: len(png) // 2])
    noise = root / "refs" / "noise.jpg"
    Image.effect_noise((64, 48), 50).convert("RGB").save(noise)  # noise: the half cut off holds image data
    jpeg = noise.read_bytes()
    (root / "refs" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # an interrupted download
    return root


def _write(root: Path, lines: list) -> Path:
    """Write records (dicts become JSON, strings go in as they are) one per line."""
    path = root / "manifest.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


DOG = {"label": "dog", "box": [0.05, 0.3, 0.45, 0.95], "mask": "masks/0001_dog.png", "references": ["refs/dog.jpg"]}
TEAPOT = {"label": "teapot", "box": {"x0": 0.5, "y0": 0.4, "x1": 0.9, "y1": 0.9}, "references": "crop"}
GOOD = {"image": "images/0001.jpg", "caption": "A Dog and a teapot on a table", "subjects": [DOG, TEAPOT],
        "kind": "intra"}
CAT = {"image": "images/0002.png", "caption": "a cat", "subjects": [
    {"label": "cat", "box": [0, 0, 1, 1], "references": ["refs/cat.webp", "refs/dog.jpg"]}], "kind": "cross"}


def _with(record: dict, **changes) -> dict:
    out = json.loads(json.dumps(record))
    out.update(changes)
    return out


def _subject(record: dict, i: int = 0, **changes) -> dict:
    out = json.loads(json.dumps(record))
    out["subjects"][i].update(changes)
    return out


# --------------------------------------------------------------------------- a valid manifest


def test_valid_manifest_reads(dataset):
    records = read_manifest(_write(dataset, [GOOD, CAT]))
    assert [r.line for r in records] == [1, 2]
    first, second = records
    assert isinstance(first, Record) and first.image == dataset / "images" / "0001.jpg"
    assert first.caption == "A Dog and a teapot on a table" and first.kind == "intra"
    dog, teapot = first.subjects
    assert isinstance(dog, SubjectRecord)
    assert dog.label == "dog" and dog.box == (0.05, 0.3, 0.45, 0.95)
    assert dog.mask == dataset / "masks" / "0001_dog.png"
    assert dog.references == (dataset / "refs" / "dog.jpg",) and not dog.crop_from_target
    assert teapot.box == (0.5, 0.4, 0.9, 0.9)  # the dict form of a box
    assert teapot.mask is None and teapot.references == () and teapot.crop_from_target
    assert second.kind == "cross" and len(second.subjects[0].references) == 2


def test_kind_defaults_to_intra_and_absolute_paths_are_kept(dataset):
    record = _with(GOOD, image=str(dataset / "images" / "0001.jpg"))
    del record["kind"]
    (r,) = read_manifest(_write(dataset, [record]))
    assert r.kind == "intra" and r.image == dataset / "images" / "0001.jpg"


def test_blank_lines_are_skipped_and_line_numbers_stay_right(dataset):
    path = _write(dataset, ["", GOOD, "   ", "", CAT, ""])
    assert [r.line for r in read_manifest(path)] == [2, 5]
    path = _write(dataset, ["", GOOD, "", _with(CAT, caption="a dog")])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert [line for line, _ in info.value.problems] == [4]
    assert "manifest.jsonl line 4: subject 1: label \"cat\" is not in the caption" in str(info.value)


def test_check_files_false_skips_the_files(dataset):
    record = _with(GOOD, image="images/missing.jpg")
    with pytest.raises(ManifestError):
        read_manifest(_write(dataset, [record]))
    assert len(read_manifest(_write(dataset, [record]), check_files=False)) == 1


def test_label_is_a_whole_word_case_insensitive():
    assert label_in_caption("dog", "A DOG on a sofa") and label_in_caption("dog", "a dog, sleeping")
    assert label_in_caption("red car", "a Red  car parked") and label_in_caption("t-rex", "a t-rex toy")
    assert not label_in_caption("dog", "two dogs") and not label_in_caption("dog", "hotdog stand")
    assert not label_in_caption("", "a dog")


# --------------------------------------------------------------------------- every problem, with its line


BAD_RECORDS = [
    # (record or raw line, what the problem message must contain)
    ('{"image": "images/0001.jpg", "caption": ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_with(GOOD, caption=None), '"caption" must be a non-empty string'),
    ({k: v for k, v in GOOD.items() if k != "image"}, '"image" must be the path of the target image, got nothing'),
    (_with(GOOD, subjects="dog"), '"subjects" must be a list'),
    (_with(GOOD, captoin="x"), 'unknown field "captoin"; did you mean "caption"?'),
    (_with(GOOD, image="images/missing.jpg"), "image images/missing.jpg: file not found"),
    (_subject(GOOD, 0, mask="masks/missing.png"), "subject 1 mask masks/missing.png: file not found"),
    (_subject(GOOD, 0, mask="masks/small.png"), "mask masks/small.png is 8x8 but the image is 64x48"),
    (_subject(GOOD, 0, references=["refs/broken.jpg"]), "subject 1 reference refs/broken.jpg: not an image"),
    (_subject(GOOD, 0, references=["refs/truncated.png"]), "subject 1 reference refs/truncated.png: unreadable"),
    (_subject(GOOD, 0, references=["refs/truncated.jpg"]), "subject 1 reference refs/truncated.jpg: unreadable"),
    (_subject(GOOD, 0, references=[]), '"references" must be a non-empty list of image paths or "crop"'),
    (_subject(GOOD, 0, references="crops"), '"references" must be a non-empty list'),
    (_subject(GOOD, 1, box=[0.5, 0.4, 1.5, 0.9]), "subject 2 box: x1=1.5 is out of range"),
    (_subject(GOOD, 1, box=[0.5, 0.4, 0.5, 0.9]), "subject 2 box: zero or negative area"),
    (_subject(GOOD, 1, box=[0.6, 0.4, 0.5, 0.9]), "subject 2 box: zero or negative area"),
    (_subject(GOOD, 1, box={"x0": 0.1, "y0": 0.1, "x1": 0.5}), "missing y1"),
    (_subject(GOOD, 0, label="cat"), 'subject 1: label "cat" is not in the caption'),
    (_subject(GOOD, 0, label="do"), 'subject 1: label "do" is not in the caption'),
    (_with(GOOD, subjects=[DOG] * (MAX_SUBJECTS + 1)), "9 subjects; at most 8 per record"),
    (_with(GOOD, subjects=[]), "no subjects"),
    (_with(GOOD, kind="inter"), 'unknown kind "inter"'),
    (_with(GOOD, kind="cross"), 'kind "cross" but subject 2 uses "crop"'),
]


def test_every_bad_record_is_reported_with_its_line_in_one_error(dataset):
    # line 1 is good, then one bad record per line, with a blank line in the middle that must not shift the count
    lines = [GOOD] + [bad for bad, _ in BAD_RECORDS[:10]] + [""] + [bad for bad, _ in BAD_RECORDS[10:]] + [CAT]
    path = _write(dataset, lines)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    error = info.value
    expected_lines = list(range(2, 12)) + list(range(13, 13 + len(BAD_RECORDS) - 10))
    for line, (_, expected) in zip(expected_lines, BAD_RECORDS):
        messages = [msg for n, msg in error.problems if n == line]
        assert any(expected in m for m in messages), (line, expected, messages)
        assert any(f"manifest.jsonl line {line}: " in row and expected in row for row in str(error).splitlines())
    # the good lines (1 and the last) have no problems; every bad line has at least one
    assert {n for n, _ in error.problems} == set(expected_lines)
    report = validate_manifest(path)
    assert not report.ok and [r.line for r in report.records] == [1, len(lines)]


def test_a_line_with_a_bad_field_still_has_its_files_checked(dataset):
    record = _subject(_with(GOOD, image="images/missing.jpg"), 1, box=[0, 0, 2, 1])
    with pytest.raises(ManifestError) as info:
        read_manifest(_write(dataset, [record]))
    assert [msg.split(":")[0] for _, msg in info.value.problems] == ["subject 2 box", "image images/missing.jpg"]


def test_duplicate_names_the_earlier_line(dataset):
    same_subjects = _with(GOOD, caption="a dog and a teapot, again")  # another caption does not make it new
    moved = _subject(GOOD, 0, box=[0.1, 0.3, 0.45, 0.95])  # another box does
    path = _write(dataset, [CAT, GOOD, "", moved, same_subjects])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.problems == [(5, "duplicate of line 2 (same image and same subjects); drop one")]


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no records") as info:
        read_manifest(tmp_path / "empty.jsonl")
    assert info.value.problems[0][0] == 0


def test_problems_from_a_shared_reference_are_reported_on_every_line(dataset):
    broken = _subject(CAT, 0, references=["refs/broken.jpg"])
    path = _write(dataset, [broken, _with(broken, image="images/0001.jpg")])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert [n for n, _ in info.value.problems] == [1, 2]


# --------------------------------------------------------------------------- the validator's summary


def test_summary_shows_the_counts(dataset):
    three = _with(GOOD, subjects=[DOG, TEAPOT, _with(DOG, label="table", box=[0, 0.8, 1, 1])])
    path = _write(dataset, [GOOD, CAT, _with(GOOD, image="images/0002.png", subjects=[TEAPOT]), three])
    report = validate_manifest(path)
    assert report.ok and len(report.records) == 4
    assert report.sizes == [(64, 48), (32, 32), (32, 32), (64, 48)]
    text = report.summary()
    assert "manifest.jsonl: 4 records, 0 problems" in text
    assert "subjects per record: 1: 2, 2: 1, 3: 1" in text
    assert "target resolutions: 64x48: 2, 32x32: 2" in text
    assert "kinds: intra: 3, cross: 1" in text
    assert "references: 4 subjects with reference photos, 3 cropped from the target" in text
    assert "problems: none" in text


def test_summary_lists_the_problems(dataset):
    report = validate_manifest(_write(dataset, [GOOD, _with(GOOD, kind="sideways")]))
    assert not report.ok and report.problems == [(2, report.problems[0][1])]
    assert "1 record, 1 problem" in report.summary()
    assert 'manifest.jsonl line 2: unknown kind "sideways"' in report.summary()


def test_summary_keeps_the_ten_most_common_resolutions(tmp_path):
    lines = []
    for i in range(16):  # 16 files or more are opened in threads
        _image(tmp_path / f"{i}.png", size=(8 * (i + 1), 8))
        for right in [1, 0.5] if i == 15 else [1]:  # 128x8 twice (two records, other boxes): the most common
            lines.append({"image": f"{i}.png", "caption": "a dog",
                          "subjects": [{"label": "dog", "box": [0, 0, right, 1], "references": ["0.png"]}]})
    text = validate_manifest(_write(tmp_path, lines)).summary()
    row = next(line for line in text.splitlines() if line.startswith("target resolutions"))
    assert row.startswith("target resolutions (top 10 of 16): 128x8: 2, ")
    assert row.count("x8:") == 10


# --------------------------------------------------------------------------- building a manifest from a folder


def test_build_manifest(tmp_path, caplog):
    src = tmp_path / "photos"
    # a: sidecar json with label and box; b: a mask; c: plain caption with the --label word; d: label not in caption;
    # e: no caption file (skipped too)
    _image(src / "a.jpg", size=(40, 20))
    (src / "a.txt").write_text("a teapot on a shelf\n")
    (src / "a.json").write_text(json.dumps({"label": "teapot", "box": [0.25, 0.1, 0.75, 0.9]}))
    _image(src / "b.png", size=(40, 20))
    (src / "b.txt").write_text("my Dog in the park")
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (10, 5, 30, 15))  # pixels x 10..29, y 5..14
    mask.save(src / "b_mask.png")
    _image(src / "c.webp", size=(16, 16))
    (src / "c.txt").write_text("a dog sleeping")
    _image(src / "d.png")
    (src / "d.txt").write_text("two cats")
    _image(src / "e.png")
    out = tmp_path / "out" / "manifest.jsonl"
    with caplog.at_level(logging.WARNING):
        written = build_manifest(src, out, label="dog")
    assert written == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("d.png" in w and 'label "dog" is not in the caption' in w for w in warnings)
    assert any("e.png" in w and "no caption file" in w for w in warnings)
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in raw] == ["../photos/a.jpg", "../photos/b.png", "../photos/c.webp"]
    records = read_manifest(out)
    a, b, c = records
    assert a.subjects[0].label == "teapot" and a.subjects[0].box == (0.25, 0.1, 0.75, 0.9)
    assert a.caption == "a teapot on a shelf"
    assert b.subjects[0].label == "dog" and b.subjects[0].box == (0.25, 0.25, 0.75, 0.75)
    assert c.subjects[0].box == (0.0, 0.0, 1.0, 1.0)
    assert all(r.kind == "intra" and r.subjects[0].crop_from_target for r in records)
    assert a.image.resolve() == (src / "a.jpg").resolve()


def test_build_manifest_without_label_skips_plain_images(tmp_path, caplog):
    _image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a dog")
    with caplog.at_level(logging.WARNING):
        assert build_manifest(tmp_path, tmp_path / "m.jsonl") == 0
    assert any("no label" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "m.jsonl").read_text() == ""
