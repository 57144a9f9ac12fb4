"""Reference encoding in the real ComfyUI 0.3.75 server: tiny 24-layer CLIP vision -> two MS-Bench subjects ->
HMoE fusion from models/troupe -> granularity override -> fusion-weight chart (issue 3, DynaIP Sec. 4.2, B.4)."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from comfy_server import PromptError
from PIL import Image
from safetensors.torch import save_file

WIDTH = 64  # TroupeTestTinyCLIPVision's width
FUSION = "hmoe_tiny_w64.safetensors"
FUSION_WRONG = "hmoe_tiny_w32.safetensors"


def write_fusion(path, in_dim: int, seed: int) -> None:
    """An HMoE checkpoint in the documented key layout (experts.{l}.0/.2, router.0/.2), written directly."""
    g = torch.Generator().manual_seed(seed)
    e, h = 32, 16
    sd = {}
    for level in range(3):
        sd[f"experts.{level}.0.weight"] = torch.randn(e, in_dim, generator=g) * 0.1
        sd[f"experts.{level}.0.bias"] = torch.zeros(e)
        sd[f"experts.{level}.2.weight"] = torch.ones(e)
        sd[f"experts.{level}.2.bias"] = torch.zeros(e)
    sd["router.0.weight"] = torch.randn(h, 3 * in_dim, generator=g) * 0.05
    sd["router.0.bias"] = torch.zeros(h)
    sd["router.2.weight"] = torch.randn(3, h, generator=g)
    sd["router.2.bias"] = torch.zeros(3)
    save_file(sd, str(path), metadata={"format": "troupe.hmoe", "version": "1", "layers": "10,17,24"})


@pytest.fixture(scope="module")
def files(comfy_server, msbench) -> dict[str, str]:
    troupe = comfy_server.models_dir / "troupe"
    write_fusion(troupe / FUSION, WIDTH, seed=0)
    write_fusion(troupe / FUSION_WRONG, 32, seed=1)
    names = {}
    for key, rel in {"dog": "images/living/dog.jpg", "cat": "images/living/cat.jpg"}.items():
        names[key] = f"enc_{key}.jpg"
        shutil.copy(msbench / rel, comfy_server.input_dir / names[key])
    return names


def encoding_prompt(files: dict[str, str], *, fusion: str = FUSION, layers: str = "auto", depth: int = 24,
                    weights=(1.0, 0.0, 0.0), subject: int = 2) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": files["dog"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": files["cat"]}},
        "3": {"class_type": "TroupeSubject", "inputs": {"image": ["1", 0], "label": "dog", "weight": 1.0}},
        "4": {"class_type": "TroupeSubject", "inputs": {"image": ["2", 0], "label": "cat", "weight": 1.0}},
        "5": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["3", 0], "subject_2": ["4", 0]}},
        "6": {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": depth, "seed": 0}},
        "7": {"class_type": "TroupeLoadFusion", "inputs": {"fusion_name": fusion}},
        "8": {"class_type": "TroupeEncodeSubjects",
              "inputs": {"clip_vision": ["6", 0], "subjects": ["5", 0], "layers": layers, "fusion": ["7", 0]}},
        "9": {"class_type": "TroupeGranularity", "inputs": {"features": ["8", 0], "w_low": weights[0],
                                                            "w_mid": weights[1], "w_high": weights[2],
                                                            "subject": subject}},
        "10": {"class_type": "TroupeFusionWeightsPreview", "inputs": {"features": ["9", 0]}},
    }


def parse_weights(text: str) -> dict[str, tuple[list[float], list[float]]]:
    """'1 dog: routed [a, b, c]' or '... -> used [x, y, z]' lines -> {label: (routed, used)}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\d+ (\w+): routed \[([^\]]+)\](?: -> used \[([^\]]+)\])?$", line)
        assert m, line
        routed = [float(x) for x in m.group(2).split(",")]
        used = [float(x) for x in (m.group(3) or m.group(2)).split(",")]
        out[m.group(1)] = (routed, used)
    return out


def test_encode_fuse_override_and_chart(comfy_server, files, artifacts):
    entry = comfy_server.run(encoding_prompt(files))
    weights = parse_weights(entry["outputs"]["9"]["text"][0])
    assert set(weights) == {"dog", "cat"}
    for routed, _used in weights.values():
        assert abs(sum(routed) - 1.0) < 2e-3 and all(0 < w < 1 for w in routed)  # softmax: Eq. 7 of 004
    assert weights["dog"][1] == weights["dog"][0]  # subject 1 keeps the router's weights
    assert weights["cat"][1] == [1.0, 0.0, 0.0]  # subject 2 uses the artist's override (B.4)
    assert weights["dog"][0] != weights["cat"][0]  # the router sees each subject's own CLS tokens

    images = entry["outputs"]["10"]["images"]
    assert len(images) == 1 and images[0]["type"] == "temp"
    chart = Image.open(comfy_server.image_path(images[0])).convert("RGB")
    chart.save(artifacts / "fusion_weights_chart.png")
    arr = np.asarray(chart)
    assert arr.shape[1] > arr.shape[0] and arr.std() > 10  # two subject columns of bars, not blank

    # Same subjects and fusion, another override: only the granularity node and the chart run again
    again = comfy_server.run(encoding_prompt(files, weights=(0.0, 2.0, 2.0), subject=0))
    cached = next(m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached")
    assert {"6", "7", "8"} <= set(cached) and "9" not in cached  # the encoder ran once: ComfyUI's node cache
    w2 = parse_weights(again["outputs"]["9"]["text"][0])
    assert w2["dog"][0] == weights["dog"][0] and w2["cat"][0] == weights["cat"][0]  # routed: unchanged
    assert w2["dog"][1] == w2["cat"][1] == [0.0, 0.5, 0.5]


def test_wrong_width_fusion_names_both_widths(comfy_server, files):
    with pytest.raises(PromptError) as err:
        comfy_server.run(encoding_prompt(files, fusion=FUSION_WRONG))
    message = json.dumps(err.value.payload["status"]["messages"])
    assert "TroupeEncodeSubjects: input 'fusion': the file was trained for encoder width 32 but this CLIP vision model has " \
           "width 64" in message


def test_encoder_with_fewer_layers_than_requested(comfy_server, files):
    with pytest.raises(PromptError) as err:
        comfy_server.run(encoding_prompt(files, layers="10,17,24", depth=12))
    message = json.dumps(err.value.payload["status"]["messages"])
    assert "TroupeEncodeSubjects: input 'layers': layer 17 does not exist; this encoder has layers 1..12" in message


def test_unknown_fusion_file_is_refused_at_queue_time(comfy_server, files):
    with pytest.raises(PromptError) as err:
        comfy_server.queue(encoding_prompt(files, fusion="gone.safetensors"))
    assert "TroupeLoadFusion: input 'fusion_name': no file 'gone.safetensors' in models/troupe" in \
        json.dumps(err.value.payload["node_errors"])
