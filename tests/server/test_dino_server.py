"""TroupeEncodeDINO in the real ComfyUI 0.3.75 server: a tiny HF DINOv3 folder in models/dino, MS-Bench photos."""
from __future__ import annotations

import shutil

import pytest
from comfy_server import PromptError
from fixtures.tiny_models import tiny_hf_dinov3_folder

FOLDER = "tiny-dinov3-server"


@pytest.fixture(scope="module")
def dino_folder(comfy_server):
    """Written after the server started: the combo is rebuilt with the schema on every request."""
    return tiny_hf_dinov3_folder(comfy_server.models_dir / "dino" / FOLDER, layers=2)


PHOTOS = {"dog": "images/living/dog.jpg", "cat": "images/living/cat.jpg", "scene": "images/scene/mountain.jpg"}


@pytest.fixture(scope="module")
def photos(comfy_server, msbench) -> dict[str, str]:
    """MS-Bench photos in the server's input folder: two square subjects and a 1920x1280 scene."""
    names = {}
    for key, rel in PHOTOS.items():
        names[key] = f"msbench_{key}.jpg"
        shutil.copy(msbench / rel, comfy_server.input_dir / names[key])
    return names


def dino_prompt(photos: dict[str, str], dino_model: str, resolution: int = 224, whole_image: bool = True) -> dict:
    """LoadImage x2 -> TroupeSubject x2 -> TroupeSubjectList -> TroupeEncodeDINO (whole image: the scene)."""
    inputs = {"subjects": ["5", 0], "dino_model": dino_model, "resolution": resolution}
    if whole_image:
        inputs["image"] = ["6", 0]
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": photos["dog"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": photos["cat"]}},
        "3": {"class_type": "TroupeSubject", "inputs": {"image": ["1", 0], "label": "dog", "weight": 1.0}},
        "4": {"class_type": "TroupeSubject", "inputs": {"image": ["2", 0], "label": "cat", "weight": 1.0}},
        "5": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["3", 0], "subject_2": ["4", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": photos["scene"]}},
        "7": {"class_type": "TroupeEncodeDINO", "inputs": inputs},
    }


def test_dino_combo_lists_a_folder_added_while_running(comfy_server, dino_folder):
    spec = comfy_server.object_info()["TroupeEncodeDINO"]["input"]
    options = spec["required"]["dino_model"][1]["options"]  # V3 combos: ["COMBO", {"options": [...]}]
    assert options[0] == "none" and FOLDER in options
    assert spec["optional"]["clip_vision"][0] == "CLIP_VISION" and spec["optional"]["image"][0] == "IMAGE"
    assert comfy_server.object_info()["TroupeEncodeDINO"]["output"] == ["TROUPE_DINO_FEATURES"]


def test_dinov3_tokens_of_msbench_subjects_and_scene(comfy_server, dino_folder, photos):
    """Both subjects in one batch; the scene keeps its 3:2 aspect; the node's text shows the token shapes."""
    entry = comfy_server.run(dino_prompt(photos, FOLDER, resolution=230))
    text = entry["outputs"]["7"]["text"][0]
    assert f"model: {FOLDER} (dinov3_vit), 224 px" in text  # 230 snapped to 14 patches of 16
    # the crops: CLS, the 4 registers kept apart from the 14x14 patch tokens
    assert "subjects (dog, cat): cls [2, 64], registers [2, 4, 64], patches [2, 196, 64], grid 14x14" in text
    # 1920x1280 at about 224^2 pixels: 176x272 px = 11x17 patches
    assert "image: cls [1, 64], registers [1, 4, 64], patches [1, 187, 64], grid 11x17" in text


def test_unknown_folder_is_refused_at_queue_time(comfy_server, photos):
    """validate_inputs refuses it before anything runs (0.3.75 does not check V3 combo values itself).

    Runtime errors (no source, two sources) are covered by the unit tests: a failing prompt leaves a pack
    traceback in the shared server log, which test_pack_server's start-up log check reads.
    """
    with pytest.raises(PromptError) as err:
        comfy_server.queue(dino_prompt(photos, "no-such-folder"))
    assert "TroupeEncodeDINO: input 'dino_model': no folder 'no-such-folder'" in str(err.value.payload["node_errors"])
