"""Adapter and reference-LoRA files are found where users of other packs keep them (issue 15, item 3)."""
from __future__ import annotations

import pytest
from fixtures.tiny_models import ensure_comfy


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """Every folder the pack reads adapters and LoRAs from, each an empty temporary directory."""
    ensure_comfy()
    import folder_paths

    from comfyui_troupe.nodes import paths

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    roots = {}
    for name in ("troupe", "ipadapter", "ipadapter-flux", "xlabs_ipadapters", "loras"):
        root = tmp_path / name
        root.mkdir()
        roots[name] = root
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(root)], {".safetensors", ".bin"}))
    return paths, roots


def test_register_adds_the_shared_folders_and_keeps_existing_entries(monkeypatch, tmp_path):
    ensure_comfy()
    import folder_paths

    from comfyui_troupe.nodes import paths

    mine = str(tmp_path / "my_ipadapters")  # e.g. IPAdapter_plus or extra_model_paths.yaml registered it first
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([mine], {".bin"}))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "ipadapter-flux", raising=False)
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "xlabs_ipadapters", raising=False)
    paths.register_model_folders()
    assert folder_paths.folder_names_and_paths["ipadapter"] == ([mine], {".bin"})
    flux_dirs, _ = folder_paths.folder_names_and_paths["ipadapter-flux"]
    xlabs_dirs, _ = folder_paths.folder_names_and_paths["xlabs_ipadapters"]
    assert flux_dirs[0].replace("\\", "/").endswith("models/ipadapter-flux")
    assert xlabs_dirs[0].replace("\\", "/").endswith("models/xlabs/ipadapters")


def test_adapter_combo_lists_every_folder_and_names_the_folder_on_a_collision(folders):
    paths, roots = folders
    (roots["troupe"] / "r3.safetensors").write_bytes(b"x")
    (roots["ipadapter"] / "ip-adapter_sdxl.safetensors").write_bytes(b"x")
    (roots["ipadapter-flux"] / "ip-adapter.bin").write_bytes(b"x")
    (roots["xlabs_ipadapters"] / "ip-adapter.bin").write_bytes(b"x")
    (roots["loras"] / "subject_512.safetensors").write_bytes(b"x")
    found = paths.files_in(paths.ADAPTER_FOLDERS)
    assert sorted(found) == ["ip-adapter.bin [models/ipadapter-flux]", "ip-adapter.bin [models/xlabs/ipadapters]",
                             "ip-adapter_sdxl.safetensors", "r3.safetensors"]
    assert found["ip-adapter.bin [models/xlabs/ipadapters]"] == str(roots["xlabs_ipadapters"] / "ip-adapter.bin")
    assert found["r3.safetensors"] == str(roots["troupe"] / "r3.safetensors")
    assert paths.full_path("N", "adapter_name", paths.ADAPTER_FOLDERS, "ip-adapter_sdxl.safetensors") == \
        str(roots["ipadapter"] / "ip-adapter_sdxl.safetensors")
    assert paths.choices(paths.LORA_FOLDERS) == ["r3.safetensors", "subject_512.safetensors"]
    with pytest.raises(ValueError, match=r"N: input 'adapter_name': no file 'gone.bin' in models/troupe, "
                                         r"models/ipadapter, models/ipadapter-flux, models/xlabs/ipadapters"):
        paths.full_path("N", "adapter_name", paths.ADAPTER_FOLDERS, "gone.bin")


def test_one_directory_under_two_names_is_listed_once(folders, monkeypatch):
    import folder_paths

    paths, roots = folders
    (roots["troupe"] / "ms_adapter.bin").write_bytes(b"x")
    # extra_model_paths.yaml pointing ipadapter at the same directory
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(roots["troupe"])], {".bin"}))
    assert paths.choices(paths.ADAPTER_FOLDERS) == ["ms_adapter.bin"]


def test_the_nodes_offer_and_accept_the_shared_folders(folders):
    _paths, roots = folders
    from comfyui_troupe.nodes import adapter, reference_branch

    (roots["ipadapter"] / "ms_adapter.bin").write_bytes(b"x")
    (roots["loras"] / "subject_512.safetensors").write_bytes(b"x")
    schema = adapter.TroupeLoadAdapter.define_schema()
    assert next(i for i in schema.inputs if i.id == "adapter_name").options == ["ms_adapter.bin"]
    assert adapter.TroupeLoadAdapter.validate_inputs("ms_adapter.bin") is True
    assert "models/ipadapter" in adapter.TroupeLoadAdapter.validate_inputs("gone.bin")
    schema = reference_branch.TroupeReferenceBranch.define_schema()
    assert next(i for i in schema.inputs if i.id == "lora_name").options == ["none", "subject_512.safetensors"]
    assert reference_branch.TroupeReferenceBranch.validate_inputs(lora_name="subject_512.safetensors") is True
    assert "models/loras" in reference_branch.TroupeReferenceBranch.validate_inputs(lora_name="gone.safetensors")
