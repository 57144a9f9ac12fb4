"""DINO features (Sec. 3.4 of 000, Sec. 3.3 of 001): tiny random-weight DINOv2/DINOv3 in the real key layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from fixtures.tiny_models import (
    ensure_comfy,
    tiny_clip_vision,
    tiny_dinov2,
    tiny_hf_dinov2_folder,
    tiny_hf_dinov3_folder,
)
from transformers import Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTModel

from comfyui_troupe.models.encoding.clip_features import square_resize, subject_crop
from comfyui_troupe.models.encoding.dino import (
    DinoModelError,
    encode_dino,
    image_size,
    load_hf_dino,
    normalise,
    resize,
    snap_to_patch,
    split_tokens,
)

ROOT = Path(__file__).resolve().parents[2]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet, written out (not the module's constant)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
WIDTH = 64  # the tiny models' width (tests/fixtures/tiny_models.py)
LAYERS = 2


@pytest.fixture(scope="module")
def dinov3(tmp_path_factory) -> Path:
    """Tiny DINOv3 ViT/16 with 4 registers, saved with save_pretrained (real config.json + key layout)."""
    return tiny_hf_dinov3_folder(tmp_path_factory.mktemp("dino") / "tiny-dinov3", layers=LAYERS)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> Path:
    """Tiny HF DINOv2 with the same weights as tiny_dinov2(LAYERS) (ComfyUI's class)."""
    return tiny_hf_dinov2_folder(tmp_path_factory.mktemp("dino") / "tiny-dinov2", layers=LAYERS)


@pytest.fixture(scope="module")
def dinov2_registers(tmp_path_factory) -> Path:
    """Tiny Dinov2WithRegisters (2 registers); its registers start at zero, so they are randomised before saving."""
    config = Dinov2WithRegistersConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                                       patch_size=14, image_size=518, num_register_tokens=2)
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        model.embeddings.register_tokens.normal_()
    folder = tmp_path_factory.mktemp("dino") / "tiny-dinov2-reg"
    model.save_pretrained(folder)
    return folder


def photo(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


def reference_hidden(model_class, folder: Path, batch: torch.Tensor) -> torch.Tensor:
    """The transformers forward itself on ImageNet-normalised pixels: the ground truth for the token slices."""
    model = model_class.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model(pixel_values=(batch.movedim(-1, 1) - MEAN) / STD).last_hidden_state


# --------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("kind,model_class,patch,registers", [
    ("dinov3", DINOv3ViTModel, 16, 4),
    ("dinov2", Dinov2Model, 14, 0),
    ("dinov2_registers", Dinov2WithRegistersModel, 14, 2),
])
def test_hf_tokens_are_the_reference_forward_split(request, kind, model_class, patch, registers):
    folder = request.getfixturevalue(kind)
    encoder = load_hf_dino(str(folder))
    assert (encoder.patch_size, encoder.num_registers) == (patch, registers)
    dog, cat = photo(60, 90, 1), photo(80, 50, 2)
    mask = torch.zeros(80, 50)
    mask[10:70, 5:40] = 1
    whole = photo(100, 150, 3)
    feats = encode_dino(encoder, [dog[0], cat[0]], [None, mask], ["dog", "cat"], image=whole, resolution=230)

    side = snap_to_patch(230, patch)  # 224 for both patch sizes
    grid = side // patch
    crops = torch.stack([square_resize(subject_crop(dog[0]), side), square_resize(subject_crop(cat[0], mask), side)])
    ref = reference_hidden(model_class, folder, crops)
    assert ref.shape == (2, 1 + registers + grid * grid, WIDTH)
    assert feats.cls.shape == (2, WIDTH) and feats.registers.shape == (2, registers, WIDTH)
    assert feats.patches.shape == (2, grid * grid, WIDTH) and feats.grid == (grid, grid)
    torch.testing.assert_close(feats.cls, ref[:, 0])
    torch.testing.assert_close(feats.registers, ref[:, 1:1 + registers])
    torch.testing.assert_close(feats.patches, ref[:, 1 + registers:])
    assert feats.labels == ("dog", "cat") and f"{side} px" in feats.model
    # the two subjects went through one forward but are different crops
    assert not torch.allclose(feats.cls[0], feats.cls[1])

    # the whole image keeps its aspect at about 224^2 pixels: 100x150 -> 182x274 -> snapped sides
    h, w = image_size(100, 150, side, patch)
    assert feats.image.grid == (h // patch, w // patch) and w > h
    ref_image = reference_hidden(model_class, folder, resize(whole, (h, w)))
    torch.testing.assert_close(feats.image.patches, ref_image[:, 1 + registers:])
    torch.testing.assert_close(feats.image.cls, ref_image[:, 0])
    assert feats.image.patch_map().shape == (1, h // patch, w // patch, WIDTH)


def test_dinov3_register_split_matches_the_transformers_layout(dinov3):
    """[CLS | 4 registers | patches]: the HF pooler is the CLS, and the 4 registers sit right after it."""
    encoder = load_hf_dino(str(dinov3))
    hf = encoder.model.hf
    assert hf.config.num_register_tokens == 4
    img = photo(64, 64, 4)
    feats = encode_dino(encoder, [img[0]], [None], ["dog"], resolution=64)
    with torch.inference_mode():
        out = hf(pixel_values=normalise(square_resize(subject_crop(img[0]), 64)[None], encoder.mean, encoder.std))
    torch.testing.assert_close(feats.cls, out.pooler_output)
    assert feats.registers.shape == (1, 4, WIDTH) and feats.patches.shape == (1, 16, WIDTH) and feats.grid == (4, 4)
    torch.testing.assert_close(feats.registers, out.last_hidden_state[:, 1:5])


def test_normalisation_is_the_dinov3_image_processor(dinov3):
    """Our mean/std match the processor's (resize and rescale off: same pixels in, same pixel values out)."""
    processor = transformers.DINOv3ViTImageProcessorFast()
    batch = torch.rand(2, 32, 48, 3)
    expected = processor(images=list(batch.movedim(-1, 1)), do_resize=False, do_rescale=False,
                         return_tensors="pt")["pixel_values"]
    encoder = load_hf_dino(str(dinov3))
    torch.testing.assert_close(normalise(batch, encoder.mean, encoder.std), expected)


def test_preprocessor_config_overrides_mean_and_std(tmp_path, dinov3):
    folder = tmp_path / "sat"
    folder.mkdir()
    for f in dinov3.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.43, 0.411, 0.296],
                                                                 "image_std": [0.213, 0.156, 0.143]}))
    encoder = load_hf_dino(str(folder))
    assert encoder.mean == (0.43, 0.411, 0.296) and encoder.std == (0.213, 0.156, 0.143)


def test_sizes_snap_to_the_patch():
    assert snap_to_patch(224, 14) == 224 and snap_to_patch(224, 16) == 224
    assert snap_to_patch(200, 14) == 196 and snap_to_patch(5, 16) == 16
    assert image_size(100, 100, 224, 16) == (224, 224)
    assert image_size(100, 200, 224, 14) == (154, 322)  # 158.4 x 316.8 -> multiples of 14


def test_split_tokens_checks_the_count():
    tokens = split_tokens(torch.randn(2, 1 + 4 + 6, 8), 4, (2, 3))
    assert tokens.registers.shape == (2, 4, 8) and tokens.patch_map().shape == (2, 2, 3, 8)
    with pytest.raises(RuntimeError, match=r"expected \[N, 10, D\]"):
        split_tokens(torch.randn(2, 11, 8), 3, (2, 3))


def test_features_are_normal_tensors_usable_in_a_loss(dinov3):
    """Computed under inference_mode but returned as normal tensors: an alignment loss can save them for backward."""
    feats = encode_dino(load_hf_dino(str(dinov3)), [photo(32, 32, 5)[0]], [None], ["dog"], resolution=32)
    assert not feats.cls.is_inference()
    h = torch.randn(1, WIDTH, requires_grad=True)
    (h * feats.cls).sum().backward()
    torch.testing.assert_close(h.grad, feats.cls)


# --------------------------------------------------------------------------- errors


def write_config(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_a_folder_that_is_not_dino_names_its_model_type(tmp_path):
    with pytest.raises(DinoModelError, match=r"clip-l is not a DINO ViT: .* model_type 'clip_vision_model'"):
        load_hf_dino(str(write_config(tmp_path / "clip-l", "clip_vision_model")))
    with pytest.raises(DinoModelError, match="DINOv3 ConvNeXt has no CLS/patch tokens"):
        load_hf_dino(str(write_config(tmp_path / "convnext", "dinov3_convnext")))


def test_old_transformers_says_which_version_dinov3_needs(monkeypatch, dinov3, dinov2):
    # importing a transformers model replaces sys.modules["transformers"] (4.57): patch the live module
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.55.4")
    with pytest.raises(DinoModelError, match=r"DINOv3 needs transformers >= 4.56 .* transformers 4.55.4"):
        load_hf_dino(str(dinov3))
    assert load_hf_dino(str(dinov2)).patch_size == 14  # DINOv2 still loads on older transformers


def test_missing_transformers_is_a_clear_error(monkeypatch, dinov2):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DinoModelError, match=r"need the transformers package: pip install"):
        load_hf_dino(str(dinov2))


def test_models_dino_imports_without_transformers():
    """The optional dependency is imported where it is used: the module loads with transformers blocked."""
    code = ("import sys, importlib.util; sys.modules['transformers'] = None; "
            f"spec = importlib.util.spec_from_file_location('troupe', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); m = importlib.util.module_from_spec(spec); "
            "sys.modules['troupe'] = m; spec.loader.exec_module(m); import troupe.models.encoding.dino")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


# --------------------------------------------------------------------------- ComfyUI's DINOv2 and the node


@pytest.fixture(scope="module")
def comfy_nodes():
    """ComfyUI importable on CPU, then the pack's DINO node module (it imports comfy)."""
    ensure_comfy()
    from comfyui_troupe.nodes import dino as node_dino

    return node_dino


def test_comfy_dinov2_tokens_equal_transformers_at_518(comfy_nodes, dinov2):
    """ComfyUI's Dinov2Model (Load CLIP Vision) with the HF folder's weights gives the HF tokens at 518 px."""
    from comfyui_troupe.models.layout.subject import Subject

    cv = tiny_dinov2(layers=LAYERS)  # same seed and weights as the dinov2 folder
    dog = Subject(image=photo(60, 90, 1), label="dog")
    cat_mask = torch.zeros(1, 80, 50)
    cat_mask[:, 10:70, 5:40] = 1
    cat = Subject(image=photo(80, 50, 2), label="cat", mask=cat_mask)
    whole = photo(100, 150, 3)
    feats = comfy_nodes.encode_subjects_dino((dog, cat), clip_vision=cv, image=whole, resolution=224)

    assert feats.cls.shape == (2, WIDTH) and feats.registers.shape == (2, 0, WIDTH)
    assert feats.patches.shape == (2, 37 * 37, WIDTH) and feats.grid == (37, 37)
    assert feats.image.grid == (37, 37)  # the whole image is stretched to 518x518: no position interpolation
    assert feats.model == f"DINOv2 (ComfyUI, {LAYERS} layers, width {WIDTH}, 518 px)"
    crops = torch.stack([square_resize(subject_crop(dog.image[0]), 518),
                         square_resize(subject_crop(cat.image[0], cat_mask[0]), 518)])
    ref = reference_hidden(Dinov2Model, dinov2, crops)
    torch.testing.assert_close(feats.cls, ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.patches, ref[:, 1:], rtol=1e-4, atol=1e-4)
    ref_image = reference_hidden(Dinov2Model, dinov2, resize(whole, (518, 518)))
    torch.testing.assert_close(feats.image.patches, ref_image[:, 1:], rtol=1e-4, atol=1e-4)
    assert (f"subjects (dog, cat): cls [2, {WIDTH}], registers [2, 0, {WIDTH}], patches [2, 1369, {WIDTH}], "
            "grid 37x37") in feats.summary()


def test_hf_folder_through_the_node_and_its_combo(tmp_path, monkeypatch, comfy_nodes, dinov3):
    """The dino_model combo is rebuilt with the schema (each /object_info and /prompt) and the folder loads."""
    import folder_paths

    from comfyui_troupe.models.layout.subject import Subject

    root = tmp_path / "dino"
    root.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dino", ([str(root)], set()))

    def options():
        schema = comfy_nodes.TroupeEncodeDINO.define_schema()
        return next(i for i in schema.inputs if i.id == "dino_model").options

    assert options() == ["none"]
    (root / "tiny-dinov3").symlink_to(dinov3, target_is_directory=True)
    assert options() == ["none", "tiny-dinov3"]
    subject = Subject(image=photo(40, 40, 7), label="dog")
    out = comfy_nodes.TroupeEncodeDINO.execute(subjects=(subject,), dino_model="tiny-dinov3", resolution=70)
    feats = out.result[0]
    assert feats.registers.shape == (1, 4, WIDTH) and feats.grid == (4, 4)  # 70 px snapped to 64
    assert feats.model == "tiny-dinov3 (dinov3_vit), 64 px"
    assert out.ui.as_dict()["text"][0] == feats.summary()
    # a second run reuses the loaded model (one folder is kept, managed by a ModelPatcher)
    (_, patcher), = comfy_nodes._HF_CACHE.values()
    assert comfy_nodes.hf_dino_encoder("tiny-dinov3").model is patcher.model


def test_node_errors_name_the_source_to_fix(tmp_path, monkeypatch, comfy_nodes):
    import folder_paths

    from comfyui_troupe.models.layout.subject import Subject

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dino", ([str(tmp_path)], set()))

    subjects = (Subject(image=photo(32, 32, 8), label="dog"),)
    with pytest.raises(ValueError, match=r"TroupeEncodeDINO: no DINO model: connect a DINOv2 .* 'dino_model'"):
        comfy_nodes.encode_subjects_dino(subjects)
    with pytest.raises(ValueError, match=r"both 'clip_vision' and 'dino_model' \(tiny\) are given; keep one"):
        comfy_nodes.encode_subjects_dino(subjects, clip_vision=tiny_dinov2(layers=1), dino_model="tiny")
    with pytest.raises(ValueError, match=r"input 'clip_vision': got a CLIPVisionModelProjection, not a DINOv2 model; "
                                         r"for CLIP/SigLIP use TroupeEncodeSubjects"):
        comfy_nodes.encode_subjects_dino(subjects, clip_vision=tiny_clip_vision(layers=1))
    with pytest.raises(ValueError, match=r"TroupeEncodeDINO: input 'dino_model': no model folder 'gone'"):
        comfy_nodes.encode_subjects_dino(subjects, dino_model="gone")


def test_whole_image_batch_must_match_the_subjects(comfy_nodes):
    """One whole image, or one per subject; any other batch names the input and both counts."""
    from comfyui_troupe.models.layout.subject import Subject

    cv = tiny_dinov2(layers=1)
    subjects = (Subject(image=photo(32, 32, 8), label="dog"), Subject(image=photo(32, 40, 9), label="cat"))
    per_subject = comfy_nodes.encode_subjects_dino(subjects, clip_vision=cv, image=torch.rand(2, 40, 60, 3))
    assert per_subject.image.cls.shape == (2, WIDTH)
    with pytest.raises(ValueError, match=r"TroupeEncodeDINO: input 'image': a batch of 3 images does not match the "
                                         r"2 subjects; give one whole image, or one per subject"):
        comfy_nodes.encode_subjects_dino(subjects, clip_vision=cv, image=torch.rand(3, 40, 60, 3))


class _Marker:
    """A pickle that would create a marker file if it ever ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("damage", ["pickle with code", "truncated safetensors"])
def test_a_bad_weight_file_in_a_dino_folder_is_named_never_run(tmp_path, damage):
    """transformers blames TensorFlow (from_tf=True) for both; the message says what is wrong with which file."""
    import pickle

    folder = tiny_hf_dinov2_folder(tmp_path / "dino", layers=1)
    weights, marker = folder / "model.safetensors", tmp_path / "ran"
    if damage == "pickle with code":
        weights.unlink()
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump({"embeddings.cls_token": _Marker(str(marker))}, f)
        expected = r"the DINO folder 'dino': pytorch_model.bin is not a plain tensor file: .* refused for safety"
    else:
        weights.write_bytes(weights.read_bytes()[:200])
        expected = r"the DINO folder 'dino': model.safetensors is not a readable .safetensors file .* download it again"
    with pytest.raises(DinoModelError, match=expected) as err:
        load_hf_dino(str(folder))
    assert "from_tf" not in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()
