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
    """A pickle that would create a marker file if it ever ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_refused_never_run_and_named(tmp_path):
    path, marker = tmp_path / "evil.bin", tmp_path / "ran"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil(str(marker))}, f)
    with pytest.raises(AdapterFormatError) as err:
        read_state_dict(str(path))
    message = str(err.value)
    assert message.startswith("evil.bin is not a plain tensor file") and "refused for safety" in message
    assert "weights_only=False" not in message and len(message) < 300  # never torch's advice, never a wall of text
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "huge header", "not json"])
def test_a_broken_safetensors_file_is_named_with_the_fix(tmp_path, damage):
    from safetensors.torch import save_file

    path = tmp_path / "adapter.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    data = {"empty": b"", "truncated": data[: len(data) // 2],
            "huge header": (10**12).to_bytes(8, "little") + data[8:],
            "not json": len(b"{nope").to_bytes(8, "little") + b"{nope"}[damage]
    path.write_bytes(data)
    with pytest.raises(AdapterFormatError, match=r"^adapter.safetensors is not a readable .safetensors file \(.*\); "
                                                 r"it may be truncated or still downloading: download it again$"):
        read_state_dict(str(path))


def test_a_truncated_bin_is_named_with_the_fix(tmp_path):
    path = tmp_path / "ip.bin"
    torch.save({"image_proj": {"w": torch.randn(32, 32)}}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match=r"^ip.bin could not be read as a tensor file \(.*\); it may be "
                                                 r"truncated or not a weight file"):
        read_state_dict(str(path))


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
