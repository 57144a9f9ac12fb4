"""Joint attention masks of the reference branch (Eq. 6 of 002) against hand-built expectations.

The prompt's labels are found in ComfyUI's own FLUX T5 tokenizer ("corgi" -> 3 tokens, "Siamese cat" -> 5
tokens); the masks are rebuilt here cell by cell from the rules, independently of ``allowed_matrix``.
"""
from __future__ import annotations

import pytest
import torch
from fixtures import tiny_models as tm

PROMPT = "a corgi and a Siamese cat on a chesterfield sofa"


@pytest.fixture(scope="module")
def fr():
    tm.ensure_comfy()
    from comfyui_troupe.models.reference import branch as flux_reference

    return flux_reference


@pytest.fixture(scope="module")
def tokenizer():
    tm.ensure_comfy()
    from comfy.text_encoders.flux import T5XXLTokenizer

    return T5XXLTokenizer()


def test_labels_split_into_several_t5_tokens_are_found(fr, tokenizer):
    (corgi, cat), n = fr.label_positions(tokenizer, PROMPT, ["corgi", "Siamese cat"])
    assert n == 256  # ComfyUI pads FLUX's T5 prompt to 256 tokens
    assert corgi == [2, 3, 4] and cat == [8, 9, 10, 11, 12]
    ids = fr.token_ids(tokenizer, PROMPT)
    pieces = tokenizer.tokenizer.convert_ids_to_tokens
    assert "".join(pieces([ids[i] for i in corgi])).replace("\u2581", " ").strip() == "corgi"
    assert "".join(pieces([ids[i] for i in cat])).replace("\u2581", " ").strip() == "Siamese cat"
    # lower case label, and every occurrence
    (dogs,), _ = fr.label_positions(tokenizer, "Corgi meets corgi", ["corgi"])
    assert len(dogs) == 6


def test_a_label_not_in_the_prompt_is_a_clear_error(fr, tokenizer):
    with pytest.raises(fr.LabelNotFound, match="'teapot' is not in the prompt"):
        fr.label_positions(tokenizer, PROMPT, ["corgi", "teapot"])


def expected_allowed(n_txt, n_img, lengths, owner, concept=None, regions=None, self_only=False):
    """The rules, cell by cell: base tokens see each other; reference r sees itself (+ text and image unless
    self_only); text token t sees reference r iff no selective mask or t is a concept token of r's subject;
    image token i sees reference r iff no region rule or i is in r's subject's region."""
    starts, s = [], n_txt + n_img
    for n in lengths:
        starts.append(s)
        s += n
    total = s

    def part(p):
        if p < n_txt:
            return ("text", p)
        if p < n_txt + n_img:
            return ("image", p - n_txt)
        for r, st in enumerate(starts):
            if st <= p < st + lengths[r]:
                return ("ref", r)

    out = torch.zeros(total, total, dtype=torch.bool)
    for qi in range(total):
        for ki in range(total):
            (qk, qv), (kk, kv) = part(qi), part(ki)
            if kk != "ref" and qk != "ref":
                ok = True
            elif qk == "ref":
                ok = (kk == "ref" and kv == qv) or (kk != "ref" and not self_only)
            elif qk == "text":
                ok = concept is None or qv in concept[owner[kv]]
            else:
                ok = regions is None or bool(regions[owner[kv]][qv])
            out[qi, ki] = ok
    return out


def test_selective_mask_for_two_multi_token_labels(fr, tokenizer):
    positions, _ = fr.label_positions(tokenizer, PROMPT, ["corgi", "Siamese cat"])
    n_txt = 16  # a shortened text for a readable matrix; positions are < 16
    spec = fr.MaskSpec(n_txt=n_txt, n_img=6, ref_lengths=(4, 3), ref_subject=(0, 1),
                       concept_positions=tuple(tuple(p) for p in positions))
    got = fr.allowed_matrix(spec)
    assert torch.equal(got, expected_allowed(n_txt, 6, (4, 3), (0, 1), concept=positions))
    # spot checks written out by hand
    r1, r2 = slice(22, 26), slice(26, 29)
    assert got[2, r1].all() and got[4, r1].all() and not got[2, r2].any()
    assert got[8, r2].all() and got[12, r2].all() and not got[8, r1].any()
    assert not got[0, 22:].any() and not got[5, 22:].any() and not got[13, 22:].any()
    assert got[16:22, 22:].all()  # image tokens see every reference (no region rule)
    assert not got[r1, r2].any() and not got[r2, r1].any()  # never reference to reference
    assert got[r1, :22].all() and got[r1, r1].all()
    mask = fr.additive_mask(spec)
    assert torch.equal(mask == 0, got) and torch.isinf(mask[~got]).all()


def test_region_mask_from_a_layout(fr):
    from comfyui_troupe.models.layout.layout import Layout, Region

    layout = Layout(64, 32, (Region(box=(0.0, 0.0, 0.5, 1.0)), Region(box=(0.5, 0.0, 1.0, 0.5))))
    h, w = 2, 4  # image tokens: 2 rows x 4 columns
    regions = fr.region_tokens(layout.masks(h, w))
    want = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)  # subject 1 left half; subject 2 top right
    assert torch.equal(regions, want)
    spec = fr.MaskSpec(n_txt=3, n_img=8, ref_lengths=(2, 2, 2), ref_subject=(0, 1, 1), image_regions=regions)
    got = fr.allowed_matrix(spec)
    assert torch.equal(got, expected_allowed(3, 8, (2, 2, 2), (0, 1, 1), regions=regions))
    assert got[3 + 4, 11:13].all() and not got[3 + 4, 13:].any()  # bottom-left token: subject 1 only
    assert not got[3 + 7, 11:].any()  # bottom-right token: in no region, sees no reference
    assert got[3 + 2, 13:17].all() and not got[3 + 2, 11:13].any()  # top-right: both views of subject 2


def test_self_cached_mask_and_weights(fr):
    spec = fr.MaskSpec(n_txt=2, n_img=2, ref_lengths=(2, 1), ref_subject=(0, 1), self_only=True,
                       weights=(2.0, 0.0))
    got = fr.allowed_matrix(spec)
    assert torch.equal(got, expected_allowed(2, 2, (2, 1), (0, 1), self_only=True))
    mask = fr.additive_mask(spec)
    assert torch.allclose(mask[:4, 4:6], torch.full((4, 2), float(torch.log(torch.tensor(2.0)))))
    assert torch.isinf(mask[:4, 6]).all()  # weight 0: subject 2's reference is not attended at all
    assert (mask[4:6, :4] == float("-inf")).all()


def test_masked_text_tokens_equal_a_run_without_references(fr):
    """Text tokens outside the labels (and image tokens outside the regions) get exactly the attention output
    of the same tokens with the references removed from the sequence."""
    torch.manual_seed(0)
    n_txt, n_img, lengths = 6, 4, (3, 2)
    L = n_txt + n_img + sum(lengths)
    q, k, v = (torch.randn(1, 2, L, 8) for _ in range(3))
    regions = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    spec = fr.MaskSpec(n_txt=n_txt, n_img=n_img, ref_lengths=lengths, ref_subject=(0, 1),
                       concept_positions=((1,), (3, 4)), image_regions=regions)
    full = fr.sdpa_attention(q, k, v, mask=fr.additive_mask(spec)[None])
    base = n_txt + n_img
    alone = fr.sdpa_attention(q[:, :, :base], k[:, :, :base], v[:, :, :base])
    for row in (0, 2, 5, n_txt + 2, n_txt + 3):  # not a concept token / not in a region
        torch.testing.assert_close(full[:, row], alone[:, row], atol=1e-6, rtol=1e-6)
    for row in (1, 3, 4, n_txt, n_txt + 1):
        assert (full[:, row] - alone[:, row]).abs().max() > 1e-3


def test_blocked_text_columns(fr):
    spec = fr.MaskSpec(n_txt=4, n_img=2, ref_lengths=(2,), ref_subject=(0,), blocked_text=(1,))
    mask = fr.additive_mask(spec)
    assert torch.isinf(mask[[0, 2, 3, 4, 5, 6, 7], 1]).all() and mask[1, 1] == 0
