"""models/adapter_file.py: safe reading of adapter files and format detection shared by SDXL and FLUX."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from comfyui_troupe.models.adapter_file import (
    Adapter,
    AdapterFamily,
    AdapterFormatError,
    detect_and_load,
    read_state_dict,
)


def test_nested_bin_and_flat_safetensors_read_the_same(tmp_path):
    nested = {"image_proj": {"proj.weight": torch.ones(2, 3)},
              "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 2), "1.to_v_ip.weight": torch.full((4, 2), 2.0)}}
    torch.save(nested, tmp_path / "a.bin")
    flat = {"image_proj.proj.weight": torch.ones(2, 3), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 2),
            "ip_adapter.1.to_v_ip.weight": torch.full((4, 2), 2.0)}
    save_file(flat, str(tmp_path / "a.safetensors"))
    for name in ("a.bin", "a.safetensors"):
        sd = read_state_dict(str(tmp_path / name))
        assert sorted(sd) == sorted(flat)
        assert all(torch.equal(sd[k], flat[k]) for k in flat)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(AdapterFormatError, match=r"could not read .*evil.bin safely \(torch.load weights_only=True\)"):
        read_state_dict(str(path))
    assert "this must never run" not in capsys.readouterr().out


def test_detection_asks_each_family_and_names_what_it_found():
    toy = AdapterFamily(name="toy", formats={"toy-v1": "toy.weight"},
                        detect=lambda sd: "toy-v1" if "toy.weight" in sd else None,
                        load=lambda sd, fmt: Adapter(family="sdxl", format=fmt, module=None, info={"subjects": 4}))
    adapter = detect_and_load({"toy.weight": torch.zeros(1)}, [toy], filename="t.safetensors")
    assert adapter.format == "toy-v1" and adapter.filename == "t.safetensors"
    assert adapter.summary() == "t.safetensors: toy-v1 (SDXL)\n  subjects: 4"
    sd = {"other.a": torch.zeros(1), "other.b": torch.zeros(1), "x": torch.zeros(1)}
    with pytest.raises(AdapterFormatError, match=r"not a known adapter format: found other.\* \(2\), x.\* \(1\); "
                                                 r"accepted formats: toy-v1 \(toy.weight\)"):
        detect_and_load(sd, [toy])
