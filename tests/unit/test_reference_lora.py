"""Reference LoRA files (models/reference_lora.py): MOSAIC's published PEFT layout and Troupe's own."""
from __future__ import annotations

import pickle

import pytest
import torch
from fixtures import tiny_models as tm
from fixtures.reference_loras import (
    HIDDEN,
    MLP,
    MOSAIC_MODULES,
    mosaic_lora_state_dict,
    troupe_lora_state_dict,
    zero_lora,
)

from comfyui_troupe.models.adapter_file import AdapterFormatError, read_state_dict
from comfyui_troupe.models.reference.lora import FluxDims, detect_format, load_reference_lora

DIMS = FluxDims(hidden=HIDDEN, mlp_hidden=MLP, in_channels=64, depth=2, depth_single=2)


def test_dims_are_read_off_the_tiny_flux():
    assert FluxDims.from_model(tm.tiny_flux().model.diffusion_model) == DIMS


def test_mosaic_layout_loads_onto_comfyui_modules():
    sd = mosaic_lora_state_dict(rank=4)
    assert detect_format(sd) == "mosaic"
    assert len(sd) == 2 * (1 + 6 * 2 + 6 * 2)  # x_embedder + 6 per double + 6 per single block, A and B
    lora = load_reference_lora(sd, DIMS)
    assert lora.format == "mosaic" and lora.rank == 4
    want = {"img_in"} | {f"double_blocks.{i}.{m}" for i in range(2) for m in
                         ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.2")} | {
        f"single_blocks.{i}.{m}" for i in range(2) for m in ("modulation.lin", "linear1", "linear2")}
    assert set(lora.modules()) == want
    assert len(lora.parts["double_blocks.0.img_attn.qkv"]) == 3  # to_q, to_k, to_v
    assert len(lora.parts["single_blocks.1.linear1"]) == 4  # to_q, to_k, to_v, proj_mlp


def _delta(sd, name, x):
    a, b = sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"]
    return x @ a.T @ b.T


def test_split_projections_land_on_the_fused_rows():
    """ComfyUI fuses q, k, v (double) and q, k, v, mlp (single linear1): diffusers' separate LoRAs must add to
    rows [0, H), [H, 2H), [2H, 3H) and [3H, 3H + MLP) (comfy/utils.py flux_to_diffusers), computed here."""
    sd = mosaic_lora_state_dict(rank=3)
    lora = load_reference_lora(sd, DIMS)
    x = torch.randn(2, 5, HIDDEN)
    got = lora.apply("double_blocks.1.img_attn.qkv", x, torch.zeros(2, 5, 3 * HIDDEN))
    want = torch.cat([_delta(sd, f"transformer_blocks.1.attn.to_{p}", x) for p in "qkv"], -1)
    torch.testing.assert_close(got, want)
    got = lora.apply("single_blocks.0.linear1", x, torch.zeros(2, 5, 3 * HIDDEN + MLP))
    want = torch.cat([_delta(sd, f"single_transformer_blocks.0.attn.to_{p}", x) for p in "qkv"]
                     + [_delta(sd, "single_transformer_blocks.0.proj_mlp", x)], -1)
    torch.testing.assert_close(got, want)
    xin = torch.randn(1, 4, HIDDEN + MLP)
    base = torch.randn(1, 4, HIDDEN)
    torch.testing.assert_close(lora.apply("single_blocks.0.linear2", xin, base, strength=0.5),
                               base + 0.5 * _delta(sd, "single_transformer_blocks.0.proj_out", xin))
    assert torch.equal(lora.apply("double_blocks.0.txt_attn.qkv", x, base), base)  # text modules: never


def test_missing_and_unexpected_keys_are_named():
    sd = mosaic_lora_state_dict()
    del sd["transformer.transformer_blocks.1.ff.net.2.lora_B.weight"]
    sd["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight"] = torch.zeros(4, HIDDEN)
    with pytest.raises(AdapterFormatError) as e:
        load_reference_lora(sd, DIMS)
    msg = str(e.value)
    assert "missing keys: transformer.transformer_blocks.1.ff.net.2.lora_B.weight" in msg
    assert "unexpected keys: transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in msg


def test_a_lora_for_a_deeper_or_wider_model_is_refused():
    sd = mosaic_lora_state_dict()
    deeper = FluxDims(hidden=HIDDEN, mlp_hidden=MLP, in_channels=64, depth=3, depth_single=2)
    with pytest.raises(AdapterFormatError, match="missing keys: transformer.transformer_blocks.2"):
        load_reference_lora(sd, deeper)
    wider = FluxDims(hidden=2 * HIDDEN, mlp_hidden=2 * MLP, in_channels=64, depth=2, depth_single=2)
    with pytest.raises(AdapterFormatError, match="another FLUX size"):
        load_reference_lora(sd, wider)


def test_troupe_layout_with_alpha():
    sd = troupe_lora_state_dict(rank=4, alpha=2.0)
    assert detect_format(sd) == "troupe"
    lora = load_reference_lora(sd, DIMS)
    x = torch.randn(3, HIDDEN)
    d, u = sd["double_blocks.0.img_mlp.0.lora_down.weight"], sd["double_blocks.0.img_mlp.0.lora_up.weight"]
    torch.testing.assert_close(lora.apply("double_blocks.0.img_mlp.0", x, torch.zeros(3, MLP)), 0.5 * (x @ d.T @ u.T))
    bad = dict(sd)
    bad["double_blocks.0.img_mlp.9.lora_up.weight"] = torch.zeros(1)
    del bad["img_in.lora_up.weight"]
    with pytest.raises(AdapterFormatError, match=r"missing keys: img_in.lora_up.weight.*unexpected keys: "
                                                 r"double_blocks.0.img_mlp.9.lora_up.weight"):
        load_reference_lora(bad, DIMS)


def test_not_a_lora_is_a_clear_error():
    with pytest.raises(AdapterFormatError, match="not a reference LoRA"):
        load_reference_lora({"foo.weight": torch.zeros(2)}, DIMS)


def test_files_are_read_safely(tmp_path):
    path = tm.write_checkpoint(tmp_path / "subject_512.safetensors", mosaic_lora_state_dict())
    assert load_reference_lora(read_state_dict(str(path)), DIMS).rank == 4
    torch.save(troupe_lora_state_dict(), tmp_path / "mine.bin", pickle_protocol=2)
    assert load_reference_lora(read_state_dict(str(tmp_path / "mine.bin")), DIMS).format == "troupe"

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(AdapterFormatError, match=r"evil.bin is not a plain tensor file: .* refused for safety"):
        read_state_dict(str(tmp_path / "evil.bin"))


def test_mosaic_names_follow_the_published_target_modules():
    """The fixture keys are the names MOSAIC's LoraConfig targets (train.py target_modules), PEFT-saved."""
    names = {n for n, _, _ in MOSAIC_MODULES}
    assert "x_embedder" in names
    for i in range(2):
        for m in ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"):
            assert f"transformer_blocks.{i}.{m}" in names
        for m in ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"):
            assert f"single_transformer_blocks.{i}.{m}" in names
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in mosaic_lora_state_dict())


def test_a_mosaic_lora_loads_and_runs_in_the_tiny_flux():
    tm.ensure_comfy()
    import comfy.ldm.flux.math

    from comfyui_troupe.models.reference import branch as fr
    from comfyui_troupe.nodes.reference_branch import install_branch

    model = tm.tiny_flux()
    dit = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(16, 8, 8, generator=g) for _ in range(2)]
    pos, neg = tm.flux_conditioning(0, tokens=16), tm.flux_conditioning(1, tokens=16)
    outs = []
    for sd in (mosaic_lora_state_dict(rank=4), zero_lora(mosaic_lora_state_dict(rank=4)), None):
        lora = None if sd is None else load_reference_lora(sd, FluxDims.from_model(dit))
        m = install_branch(model, fr.ReferenceBranch(dit=dit, latents=lats, ref_subject=[0, 1],
                                                     options=fr.ReferenceOptions(), lora=lora),
                           comfy.ldm.flux.math.attention)
        outs.append(tm.sample(m, pos, neg, torch.zeros(1, 16, 16, 16), steps=3))
    assert torch.isfinite(outs[0]).all()
    assert (outs[0] - outs[2]).abs().max() > 1e-4  # the LoRA acts (through the references)
    torch.testing.assert_close(outs[1], outs[2], atol=1e-5, rtol=1e-5)  # a zero LoRA is no LoRA
