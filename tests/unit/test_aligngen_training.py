"""AlignGen's training pieces (training/aligngen.py; AlignGen "Training Strategy" and "Implementation details"):
random reference dropout and random concept-name substitution at their configured rates, the manifest's
parent_class / category, the config keys, the optional Prodigy optimiser, S* and DEM files.

Rates are counted over 1,000 draws with a fixed seed. Tolerance: 4 binomial standard deviations,
4 * sqrt(n p (1 - p)) (about 63 draws at p = 0.5); a correct sampler falls outside it with probability about 6e-5,
and at p = 0.5 or 0.3 a sampler whose rate is off by a quarter (0.5 read as 0.625) lands outside it.
"""
from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from PIL import Image

from comfyui_troupe.training.aligngen import (
    SStar,
    black_reference,
    concept_names,
    draw_reference_dropout,
    new_dem,
    save_dem,
    save_s_star,
    substitute_concept,
)
from comfyui_troupe.training.config import ConfigError, parse_config
from comfyui_troupe.training.manifest import ManifestError, read_manifest

N = 1000


def within(count: int, p: float, n: int = N) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.1])
def test_reference_dropout_happens_at_the_configured_rate(rate):
    gen = torch.Generator().manual_seed(0)
    count = sum(draw_reference_dropout(gen, rate) for _ in range(N))
    assert within(count, rate), count
    assert not any(draw_reference_dropout(gen, 0.0) for _ in range(100))
    assert all(draw_reference_dropout(gen, 1.0) for _ in range(100))
    ref = torch.rand(3, 8, 8)
    assert torch.equal(black_reference(ref), torch.zeros(3, 8, 8))


@pytest.mark.parametrize("probability", [0.5, 0.3])
def test_concept_substitution_happens_at_the_configured_rate_with_either_name(probability):
    gen = torch.Generator().manual_seed(1)
    caption = "An Acoustic guitar leans on a wall; the acoustic  guitar is old, acoustic guitars are loud"
    seen = {"acoustic guitar": 0, "guitar": 0, "musical instrument": 0}
    for _ in range(N):
        text, word = substitute_concept(caption, "acoustic guitar", ("guitar", "musical instrument"), probability,
                                        gen)
        seen[word] += 1
        if word != "acoustic guitar":  # every whole-word occurrence, any case or spacing; "guitars" is another word
            assert text == (f"An {word} leans on a wall; the {word} is old, acoustic guitars are loud")
        else:
            assert text == caption
    substituted = seen["guitar"] + seen["musical instrument"]
    assert within(substituted, probability)
    assert within(seen["guitar"], 0.5, substituted)  # the two names equally likely
    gen = torch.Generator().manual_seed(2)
    assert all(substitute_concept("a dog", "dog", (), 1.0, gen) == ("a dog", "dog") for _ in range(20))


def test_the_draws_take_a_fixed_count_of_random_numbers():
    """Whatever the outcome, each draw consumes the same numbers: the data stream after it does not shift."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    substitute_concept("a dog", "dog", ("animal",), 0.0, a)
    substitute_concept("a dog", "dog", ("animal",), 1.0, b)
    draw_reference_dropout(a, 0.0)
    draw_reference_dropout(b, 1.0)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --------------------------------------------------------------------------- manifest


def test_manifest_reads_parent_class_and_category_and_names_bad_ones_by_line(tmp_path):
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "t.png")
    good = {"image": "t.png", "caption": "an acoustic guitar", "subjects": [
        {"label": "acoustic guitar", "box": [0, 0, 1, 1], "references": "crop", "parent_class": " guitar ",
         "category": "musical instrument"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(good) + "\n")
    (record,) = read_manifest(tmp_path / "m.jsonl")
    assert concept_names(record.subjects[0]) == ("guitar", "musical instrument")
    only = dict(good, subjects=[{k: v for k, v in good["subjects"][0].items() if k != "category"}])
    bad1 = dict(good, subjects=[dict(good["subjects"][0], parent_class="")])
    bad2 = dict(good, subjects=[dict(good["subjects"][0], category=["instrument"])])
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in (only, bad1, bad2)) + "\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "m.jsonl")
    problems = dict(info.value.problems)
    assert set(problems) == {2, 3}
    assert '"parent_class" must be a word or phrase' in problems[2] and 'got ""' in problems[2]
    assert '"category" must be a word or phrase' in problems[3] and '["instrument"]' in problems[3]
    assert "m.jsonl line 2" in str(info.value)


# --------------------------------------------------------------------------- config and optimiser


def config(tmp_path, **sections) -> dict:
    data = {"model": {"unet": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors", "t5": "t5xxl.safetensors",
                      "vae": "ae.safetensors"},
            "method": {"name": "mosaic"}, "data": {"manifest": "m.jsonl"},
            "train": {"output_dir": str(tmp_path / "run"), "steps": 10}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def test_aligngen_keys_have_the_papers_defaults_and_are_validated(tmp_path):
    m = parse_config(config(tmp_path), tmp_path).method
    assert (m.reference_dropout, m.concept_substitution, m.s_star_name, m.s_star_init, m.dem_heads,
            m.dem_mlp_ratio, m.lora_rank) == (0.5, 0.5, "aligngen_s_star", "object", 8, 4.0, 16)
    assert parse_config(config(tmp_path), tmp_path).train.optimizer == "adamw"
    for key, value, expected in [
        ("reference_dropout", 1.5, "method.reference_dropout: expected a number in [0, 1], got 1.5"),
        ("concept_substitution", -0.1, "method.concept_substitution: expected a number in [0, 1]"),
        ("s_star_name", "embeddings/s", 'method.s_star_name: expected a file name without folder or extension'),
        ("s_star_name", "s.safetensors", "method.s_star_name: expected a file name without folder or extension"),
        ("s_star_init", " ", "method.s_star_init: expected a non-empty string"),
        ("dem_heads", 0, "method.dem_heads: expected a positive integer, got 0"),
        ("dem_mlp_ratio", 0, "method.dem_mlp_ratio: expected a number > 0, got 0"),
    ]:
        with pytest.raises(ConfigError, match="^" + expected.replace("[", r"\[").replace("]", r"\]")):
            parse_config(config(tmp_path, method={key: value}), tmp_path)
    with pytest.raises(ConfigError, match='^train.optimizer: expected one of "adamw", "prodigy", got "sgd"'):
        parse_config(config(tmp_path, train={"optimizer": "sgd"}), tmp_path)


def test_prodigy_is_refused_with_how_to_install_it_when_prodigyopt_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # importing it raises ImportError, installed or not
    with pytest.raises(ConfigError) as info:
        parse_config(config(tmp_path, train={"optimizer": "prodigy"}), tmp_path)
    assert str(info.value) == ('train.optimizer: "prodigy" needs the optional prodigyopt package, which this Python '
                               "cannot import; install it into ComfyUI's Python with `python -m pip install "
                               'prodigyopt`, or set optimizer = "adamw" (the default)')


def test_prodigy_is_built_with_the_papers_settings_when_installed(tmp_path, monkeypatch):
    """The trainer's optimiser set-up with a stand-in prodigyopt module (the package is optional and absent here):
    Prodigy gets the parameter groups, the learning rate, weight decay, safeguard warmup and bias correction."""
    from comfyui_troupe.training.trainer import Trainer

    made = {}

    class Prodigy(torch.optim.SGD):
        def __init__(self, params, lr, weight_decay, safeguard_warmup, use_bias_correction):
            made.update(lr=lr, weight_decay=weight_decay, safeguard_warmup=safeguard_warmup,
                        use_bias_correction=use_bias_correction)
            super().__init__(params, lr=lr)

    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=Prodigy))
    cfg = parse_config(config(tmp_path, train={"optimizer": "prodigy", "learning_rate": 1.0, "weight_decay": 0.01}),
                       tmp_path)
    trainer = types.SimpleNamespace(config=cfg, module=nn_linear(),
                                    acc=types.SimpleNamespace(prepare=lambda *objs: objs))
    Trainer._setup_optimiser(trainer)
    assert isinstance(trainer.optimiser, Prodigy)
    assert made == {"lr": 1.0, "weight_decay": 0.01, "safeguard_warmup": True, "use_bias_correction": True}
    cfg = parse_config(config(tmp_path), tmp_path)
    trainer = types.SimpleNamespace(config=cfg, module=nn_linear(), acc=types.SimpleNamespace(prepare=lambda *o: o))
    Trainer._setup_optimiser(trainer)
    assert type(trainer.optimiser) is torch.optim.AdamW


def nn_linear():
    return torch.nn.Linear(3, 2)


# --------------------------------------------------------------------------- files


def test_s_star_file_is_what_comfyuis_flux_tokenizer_loads_and_the_dem_starts_at_s_star(tmp_path):
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    import comfy.sd1_clip

    from comfyui_troupe.models.reference.dem import load_dem

    s = SStar(torch.randn(64))
    save_s_star(tmp_path / "emb" / "aligngen_s_star.safetensors", s)
    loaded = comfy.sd1_clip.load_embed("aligngen_s_star", [str(tmp_path / "emb")], 4096, "t5xxl")
    assert torch.equal(loaded, s.vector.detach()) and loaded.shape == (1, 64)
    dem = new_dem(64, 48, heads=4, mlp_ratio=2.0, seed=0)
    path = save_dem(tmp_path / "x.dem.safetensors", dem, 4, "aligngen_s_star")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    back = load_dem(sd, meta)
    assert not back.legacy and meta["embedding"] == "aligngen_s_star" and "s_star" not in sd
    concept, redux = torch.randn(2, 3, 64), torch.randn(2, 5, 48)
    assert torch.equal(back(concept, redux), concept[:, 0])  # zero-initialised residual outputs: S*' = S*
    with pytest.raises(ConfigError, match="method.dem_heads: 5 heads do not divide the T5 width 64"):
        new_dem(64, 48, heads=5, mlp_ratio=2.0, seed=0)
