"""SigLIP's pooled output (what InstantX's adapter reads) against transformers' SiglipVisionModel.pooler_output.

ComfyUI loads SigLIP without its attention-pooling head; the pack reads the head from the user's SigLIP file
(``models/clip_vision``) and applies it to ComfyUI's post-layernorm tokens. SigLIP has no CLS token, so the HMoE
router reads the same pooling of each level instead of token 0 (a patch token).
"""
from __future__ import annotations

import json

import pytest
import torch
from fixtures.goldens import assert_parity, golden, golden_meta
from fixtures.tiny_models import ensure_comfy, vision_model_from_config

from comfyui_troupe.models.encoding.siglip_head import PREFIX, head_from_state_dict

G = golden("siglip_pooling")
HF = {k[len("model."):]: v for k, v in G.items() if k.startswith("model.")}
HEADS = json.loads(golden_meta("siglip_pooling")["config"])["num_attention_heads"]


def comfy_config() -> dict:
    c = json.loads(golden_meta("siglip_pooling")["config"])
    return {"num_channels": 3, "hidden_act": c["hidden_act"], "hidden_size": c["hidden_size"],
            "image_size": c["image_size"], "intermediate_size": c["intermediate_size"],
            "model_type": "siglip_vision_model", "num_attention_heads": c["num_attention_heads"],
            "num_hidden_layers": c["num_hidden_layers"], "patch_size": c["patch_size"],
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="module")
def siglip():
    """ComfyUI's SigLIP with the golden's weights (the head is not part of ComfyUI's model)."""
    body = {k: v for k, v in HF.items() if not k.startswith(PREFIX)}
    return vision_model_from_config(comfy_config(), seed=0, state_dict=body)


def test_pooling_head_is_the_pooler_output():
    head = head_from_state_dict(HF, HEADS)
    with torch.no_grad():
        assert_parity(head(G["last_hidden_state"]), G["pooler_output"])
    # the old stand-in, the mean token, is not it
    assert float((G["last_hidden_state"].mean(1) - G["pooler_output"]).abs().max()) > 0.1


def test_comfyui_tokens_are_transformers_last_hidden_state(siglip):
    """ComfyUI's own SigLIP (outside the pack) uses LayerNorm eps 1e-5 where SigLIP has 1e-6: close, not exact."""
    head = head_from_state_dict(HF, HEADS)
    with torch.no_grad():
        last = siglip.model(pixel_values=G["pixel_values"])[0]
        assert_parity(last, G["last_hidden_state"], rtol=2e-3)
        assert_parity(head(last), G["pooler_output"], rtol=2e-3)


def test_the_head_is_found_in_the_users_siglip_file(siglip, tmp_path, monkeypatch):
    ensure_comfy()
    import folder_paths
    from safetensors.torch import save_file

    from comfyui_troupe.nodes import encoding

    save_file({k: v.contiguous() for k, v in HF.items()}, str(tmp_path / "siglip_tiny.safetensors"))
    save_file({k: v.contiguous() for k, v in HF.items() if not k.startswith(PREFIX)},
              str(tmp_path / "siglip_headless.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "clip_vision", ([str(tmp_path)], {".safetensors"}))
    head, name = encoding.siglip_head(siglip)
    assert name == "siglip_tiny.safetensors"
    with torch.no_grad():
        assert_parity(head(G["last_hidden_state"]), G["pooler_output"])
    other = vision_model_from_config(comfy_config(), seed=5)  # another SigLIP: its file is not there
    assert encoding.siglip_head(other) == (None, "")


def test_encoding_uses_the_head_and_warns_without_it(siglip):
    from comfyui_troupe.models.layout.subject import Subject
    from comfyui_troupe.nodes import encoding

    gen = torch.Generator().manual_seed(0)
    subjects = (Subject(image=torch.rand(1, 40, 60, 3, generator=gen), label="a"),
                Subject(image=torch.rand(1, 50, 30, 3, generator=gen), label="b"))
    head = head_from_state_dict(HF, HEADS)
    feats = encoding.encode_subjects(siglip, subjects, "1,2,3", head=head)
    assert feats.crop == "stretch" and feats.pooled_source == "attention-pooling head"
    assert feats.pooled.shape == (2, 64) and feats.summary.shape == (2, 3, 64)
    # the router's summary of the top level is the head on the post-layernorm tokens of that level
    norm = siglip.model.vision_model.post_layernorm
    with torch.no_grad():
        top = head(norm(feats.hidden[:, 2]))
    assert_parity(feats.summary[:, 2], top)
    assert "pooled output: SigLIP attention-pooling head from x.safetensors" in encoding.encoding_report(feats, "x.safetensors")
    plain = encoding.encode_subjects(siglip, subjects, "1,2,3")
    assert plain.pooled_source.startswith("mean of tokens")
    assert encoding.encoding_report(plain).splitlines()[1].startswith("WARNING: no SigLIP attention-pooling head")


def test_hmoe_routes_siglip_on_the_pooled_levels_not_token_0(siglip):
    from comfyui_troupe.models.encoding.hmoe import HMoE, HMoEConfig
    from comfyui_troupe.models.layout.subject import Subject
    from comfyui_troupe.nodes import encoding

    torch.manual_seed(0)
    fusion = HMoE(HMoEConfig(in_dim=64, out_dim=32, router_hidden=16)).eval()
    subjects = (Subject(image=torch.rand(1, 40, 60, 3), label="a"),)
    feats = encoding.encode_subjects(siglip, subjects, "1,2,3", fusion=fusion, head=head_from_state_dict(HF, HEADS))
    with torch.no_grad():
        assert_parity(feats.routed, fusion.route(feats.summary))
        assert not torch.allclose(feats.routed, fusion.route(feats.hidden[:, :, 0]))
