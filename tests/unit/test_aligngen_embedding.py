"""S* as a T5 input embedding (AlignGen: cross-modality prior alignment, Sec. 3.2 and Eqs. 3-5).

S* is a ``t5xxl`` textual-inversion file in models/embeddings that ComfyUI's own FLUX tokenizer loads for
``embedding:<name>`` in the prompt; T5 encodes it with the prompt and the DEM replaces T5's output at its position.
Checked on a real ``comfy.sd.CLIP`` for FLUX (tiny T5, 64 wide): the vector reaches T5's input at the position the
node finds, T5's output equals T5 run on the sequence built by hand, S*' equals Eqs. 3-5 computed by hand, legacy
DEM files (S* in T5's output space) give bit-for-bit what they gave before, and bad files are named.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny_models import ensure_comfy
from fixtures.training_flux import T5_WIDTH, tiny_flux_clip
from safetensors.torch import load_file, save_file

from comfyui_troupe.models.reference.dem import (
    REDUX_TOKENS,
    Alignment,
    DeviationExtractionModule,
    TokenAlignment,
    star_positions,
)

D, HEADS = T5_WIDTH, 4
PROMPT = "a photo of embedding:s_star corgi next to embedding:s_star teapot"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """models/embeddings and models/troupe for this module (registered with ComfyUI's folder_paths)."""
    ensure_comfy()
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    (root / "embeddings").mkdir()
    (root / "troupe").mkdir()
    folder_paths.add_model_folder_path("troupe", str(root / "troupe"))
    return root


@pytest.fixture(scope="module")
def s_star():
    return torch.randn(1, D, generator=torch.Generator().manual_seed(11)) * 0.5


@pytest.fixture(scope="module")
def clip(folders, s_star):
    """The tiny FLUX CLIP with ComfyUI's FluxTokenizer reading embeddings from ``folders/embeddings`` (what
    DualCLIPLoader gives a CLIP: ``embedding_directory`` = the embeddings folders)."""
    import comfy.text_encoders.flux

    save_file({"t5xxl": s_star}, str(folders / "embeddings" / "s_star.safetensors"))
    c = tiny_flux_clip().clone()
    c.tokenizer = comfy.text_encoders.flux.FluxTokenizer(embedding_directory=[str(folders / "embeddings")])
    return c


def random_dem(seed: int, legacy: bool) -> DeviationExtractionModule:
    g = torch.Generator().manual_seed(seed)
    dem = DeviationExtractionModule(dim=D, redux_dim=D, heads=HEADS, mlp_ratio=2.0, legacy_s_star=legacy)
    with torch.no_grad():
        for name, p in dem.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    return dem.eval()


def write_dem(folders, name: str, dem: DeviationExtractionModule, **meta) -> str:
    sd = {k: v.detach().contiguous() for k, v in dem.state_dict().items()}
    save_file(sd, str(folders / "troupe" / name), metadata={"format": "troupe.dem", "heads": str(HEADS), **meta})
    return name


def by_hand(sd, concept, redux):
    """Eqs. 3-5 of AlignGen written out with matmuls (pre-LayerNorm attention, GELU MLP); returns S*'."""
    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def mha(q_in, kv_in, p):
        q, k, v = (x @ sd[f"{p}.to_{n}.weight"].T for x, n in ((q_in, "q"), (kv_in, "k"), (kv_in, "v")))
        d = q.shape[-1] // HEADS
        heads = [torch.softmax(q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(-1, -2) / math.sqrt(d),
                               -1) @ v[..., h * d:(h + 1) * d] for h in range(HEADS)]
        return torch.cat(heads, -1) @ sd[p + ".to_out.weight"].T + sd[p + ".to_out.bias"]

    c = concept + mha(ln(concept, "self_attn.norm"), ln(concept, "self_attn.norm"), "self_attn")  # Eq. 3
    c = c + mha(ln(c, "cross_attn.norm_q"), ln(redux, "cross_attn.norm_kv"), "cross_attn")  # Eq. 4
    c = c + F.gelu(ln(c, "mlp.norm") @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]) @ sd["mlp.fc2.weight"].T \
        + sd["mlp.fc2.bias"]  # Eq. 5
    return c[:, 0]


def label_tokens(clip, prompt, labels):
    """The labels' T5 positions and the prompt's T5 length, as the node finds them."""
    from comfyui_troupe.nodes.reference_branch import EmbeddingsAsIds, find_labels

    return find_labels(EmbeddingsAsIds(clip.tokenizer.t5xxl), prompt, labels)


def node_positions(clip, prompt, labels):
    from comfyui_troupe.nodes.reference_branch import EmbeddingsAsIds, token_ids

    positions, n_t5 = label_tokens(clip, prompt, labels)
    ids = token_ids(EmbeddingsAsIds(clip.tokenizer.t5xxl), prompt)
    return positions, n_t5, star_positions([i == -1 for i in ids], positions, labels)


def test_embedding_reaches_t5_input_at_the_s_star_position(clip, s_star):
    """ComfyUI's tokenizer loads the file for ``embedding:s_star``; the vector is T5's input at the position the
    node takes for S*, right before the label; T5's output equals T5 run on the sequence built by hand."""
    positions, n_t5, stars = node_positions(clip, PROMPT, ["corgi", "teapot"])
    tokens = clip.tokenize(PROMPT)["t5xxl"][0]
    where = [i for i, t in enumerate(tokens) if torch.is_tensor(t[0])]
    assert where == stars and [p[0] for p in positions] == [s + 1 for s in stars]

    t5 = clip.cond_stage_model.t5xxl.transformer
    seen = {}
    real = t5.forward

    def spy(*args, **kwargs):
        seen["embeds"] = kwargs["embeds"].detach().clone()
        return real(*args, **kwargs)

    t5.forward = spy
    try:
        cond = clip.encode_from_tokens(clip.tokenize(PROMPT))
    finally:
        del t5.forward
    assert torch.equal(seen["embeds"][0, stars[0]], s_star[0]) and torch.equal(seen["embeds"][0, stars[1]], s_star[0])

    # the sequence by hand: the Hugging Face T5 tokenizer's ids for the words, S* where the prompt names it, the
    # end token (1), then pad (0) to ComfyUI's FLUX minimum of 256 tokens; the tiny T5's own embedding table
    hf = clip.tokenizer.t5xxl.tokenizer
    words = lambda text: hf(text)["input_ids"][:-1]  # without the end token the HF tokenizer appends
    ids = words("a photo of") + [None] + words("corgi next to") + [None] + words("teapot") + [1]
    ids += [0] * (256 - len(ids))
    assert len(ids) == n_t5 == cond.shape[1]
    table = t5.get_input_embeddings().weight.detach().float()
    x = torch.stack([s_star[0] if i is None else table[i] for i in ids])[None]
    assert torch.equal(seen["embeds"], x)
    with torch.no_grad():
        hand = t5.encoder(x, attention_mask=None, dtype=torch.float32)[0]
    # same modules on the same input: equal up to float reassociation inside the kernels (measured 0 here)
    torch.testing.assert_close(cond, hand, atol=1e-6, rtol=1e-6)
    moved = clip.encode_from_tokens(clip.tokenize(PROMPT.replace("embedding:s_star corgi", "corgi")))
    assert not torch.allclose(moved[0, :4], cond[0, :4])  # T5 contextualises S*: the words before it change too


def test_dem_replaces_t5_output_at_s_star_by_eqs_3_to_5(folders, clip):
    """TokenAlignment through the node's read_dem: T5's output at each S* position replaced by S*' (Eqs. 3-5 by
    hand over [S*, label tokens] and that subject's Redux tokens), everything else unchanged, Redux tokens gone."""
    from comfyui_troupe.nodes.reference_branch import read_dem

    dem = random_dem(3, legacy=False)
    assert "s_star" not in dem.state_dict()
    name = write_dem(folders, "aligngen_dem.safetensors", dem, embedding="s_star")
    positions, n_t5, stars = node_positions(clip, PROMPT, ["corgi", "teapot"])
    align = read_dem(name, positions, n_t5, clip.tokenizer.t5xxl, PROMPT, ["corgi", "teapot"])
    assert isinstance(align, TokenAlignment) and align.stars == stars

    cond = clip.encode_from_tokens(clip.tokenize(PROMPT))
    g = torch.Generator().manual_seed(4)
    redux = torch.randn(1, 2 * REDUX_TOKENS, D, generator=g)
    tail = torch.randn(1, 3, D, generator=g)  # tokens another node appended after the Redux tokens stay
    ctx = torch.cat([cond, redux, tail], 1).repeat(2, 1, 1)
    ctx[1] += 0.1  # the unconditional row differs
    out, pos, blocked = align.apply(ctx, [True, False])
    assert out.shape == (2, n_t5 + 3, D)
    keep = [i for i in range(n_t5) if i not in stars]
    assert torch.equal(out[:, keep], ctx[:, keep]) and torch.equal(out[:, n_t5:], ctx[:, -3:])
    assert torch.equal(out[1, :n_t5], ctx[1, :n_t5])  # unconditional: its own prompt's tokens, as encoded
    sd = {k: v.detach() for k, v in dem.state_dict().items()}
    for j, star in enumerate(stars):
        concept = ctx[0:1, [star] + positions[j]]
        want = by_hand(sd, concept, redux[:, REDUX_TOKENS * j: REDUX_TOKENS * (j + 1)])[0]
        torch.testing.assert_close(out[0, star], want, atol=1e-5, rtol=1e-5)  # fp32 matmul order vs SDPA
        assert (out[0, star] - ctx[0, star]).abs().max() > 1e-2  # it was replaced
    assert pos == [[[stars[0]] + positions[0], [stars[1]] + positions[1]], [[], []]] and blocked == [[], []]
    mask = torch.randn(1, ctx.shape[1] + 5, ctx.shape[1] + 5)
    aligned = align.align_mask(mask, ctx.shape[1])
    idx = list(range(n_t5)) + list(range(n_t5 + 2 * REDUX_TOKENS, ctx.shape[1] + 5))
    assert torch.equal(aligned, mask[:, idx][:, :, idx])
    with pytest.raises(ValueError, match="StyleModelApply"):
        align.compute(cond, [True])
    assert align.compute(cond, [False])[0] is cond  # an unconditional call without Redux tokens is left alone


# legacy: the aligned context below as models/reference/dem.py computed it at commit aa63b21 (before S* moved to
# T5's input space; bit for bit, sha256 dc2967f8... of its bytes on torch 2.14.1 CPU). Compared within 1e-6: another
# CPU's kernels may round the last bits differently, a real change moves values by far more
LEGACY = Path(__file__).resolve().parents[1] / "goldens" / "legacy_dem_aligned.safetensors"


def test_legacy_dem_files_give_the_same_output_as_before(folders, clip):
    from comfyui_troupe.nodes.reference_branch import read_dem

    d = 32
    g = torch.Generator().manual_seed(7)
    dem = DeviationExtractionModule(dim=d, redux_dim=d, heads=HEADS, mlp_ratio=2.0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k.endswith("norm.weight") else 0.0)
          for k, v in dem.state_dict().items()}
    ctx = torch.randn(2, 12 + 2 * REDUX_TOKENS, d, generator=g)
    save_file(sd, str(folders / "troupe" / "legacy_dem.safetensors"), metadata={"format": "troupe.dem", "heads": "4"})
    align = read_dem("legacy_dem.safetensors", [[3, 4], [7]], 12, clip.tokenizer.t5xxl, "a corgi", ["corgi"])
    assert isinstance(align, Alignment) and align.dem.legacy
    out, pos, blocked = align.apply(ctx, [True, False])
    expected = load_file(str(LEGACY))["aligned"]
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert pos == [[[3, 4, 5], [8, 9]], [[], []]] and blocked == [[], [3, 8]]


@pytest.mark.parametrize("case", ["missing", "no_t5xxl_key", "wrong_width", "two_rows", "not_before_label",
                                  "unreadable"])
def test_bad_s_star_embeddings_name_the_node_the_input_and_the_fix(folders, clip, case):
    from comfyui_troupe.nodes.reference_branch import read_dem

    emb = folders / "embeddings"
    name = write_dem(folders, "aligngen_dem.safetensors", random_dem(3, legacy=False), embedding="s_star")
    prompt, expect = {
        "missing": ("a photo of embedding:nope corgi", "embedding 'nope' is not in models/embeddings"),
        "no_t5xxl_key": ("a photo of embedding:clip_l_only corgi", "embedding 'clip_l_only' has no 't5xxl' tensor"),
        "wrong_width": ("a photo of embedding:wide corgi", r"embedding 'wide' has 't5xxl' of shape \[1, 768\]"),
        "two_rows": ("a photo of embedding:two corgi", "the embedding before the label 'corgi' is more than one"),
        "not_before_label": ("a corgi, embedding:s_star", "no S\\* embedding right before the label 'corgi'"),
        "unreadable": ("a photo of embedding:broken corgi", "embedding 'broken' .* cannot be read"),
    }[case]
    save_file({"clip_l": torch.zeros(1, 768)}, str(emb / "clip_l_only.safetensors"))
    save_file({"t5xxl": torch.zeros(1, 768)}, str(emb / "wide.safetensors"))
    save_file({"t5xxl": torch.zeros(2, D)}, str(emb / "two.safetensors"))
    (emb / "broken.safetensors").write_bytes(b"not a safetensors file")
    positions, n_t5 = label_tokens(clip, prompt, ["corgi"]) if case in ("two_rows", "not_before_label") \
        else ([[4]], 256)
    with pytest.raises(ValueError, match=f"^TroupeReferenceBranch: input 'prompt': {expect}") as info:
        read_dem(name, positions, n_t5, clip.tokenizer.t5xxl, prompt, ["corgi"])
    assert "models/embeddings" in str(info.value) or "embedding:s_star" in str(info.value)  # says how to fix it
