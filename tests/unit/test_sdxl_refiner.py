"""Progressive residual refinement (Sec. 3.2 of 000, Eqs. 1-4) against an independent computation that
loops over queries and picks each query's keys explicitly (window, or the top-k scores)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_troupe.models.sdxl.refiner import (
    INIT_SCALE,
    LevelAttention,
    ProgressiveRefiner,
    RefinerConfig,
    topk_mask,
    window_mask,
)

CFG = RefinerConfig(dim=24, tokens=12, heads=2, window=4, topk=(8, 4))


@pytest.fixture
def refiner():
    torch.manual_seed(0)
    m = ProgressiveRefiner(CFG).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("scale"):
                p.add_(torch.randn_like(p) * 0.3)
        for lv, s in zip(m.levels, (0.7, -0.4, 0.9)):  # learned scales, away from their 0.1 init
            lv.scale.fill_(s)
    return m


@pytest.fixture
def base():
    return torch.randn(3, CFG.tokens, CFG.dim, generator=torch.Generator().manual_seed(1))


def attention_by_hand(sd: dict, p: str, x: torch.Tensor, heads: int, keys_of) -> torch.Tensor:
    """Each query i attends only to ``keys_of(scores_row, i)``: softmax over those keys alone."""
    q, k, v = (x @ sd[f"{p}.to_{n}.weight"].T for n in "qkv")
    n, m, c = x.shape
    d = c // heads
    out = torch.zeros(n, m, c)
    for b in range(n):
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            for i in range(m):
                scores = [float(q[b, i, s] @ k[b, j, s]) / math.sqrt(d) for j in range(m)]
                chosen = keys_of(scores, i)
                e = torch.tensor([math.exp(scores[j] - max(scores[j] for j in chosen)) for j in chosen])
                w = e / e.sum()
                out[b, i, s] = sum(w[a] * v[b, j, s] for a, j in enumerate(chosen))
    return out @ sd[f"{p}.to_out.weight"].T + sd[f"{p}.to_out.bias"]


def rho(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 of 000: Linear_2(Tanh(Linear_1(LayerNorm(x))))."""
    h = F.layer_norm(x, (x.shape[-1],), sd[f"{p}.0.weight"], sd[f"{p}.0.bias"])
    return F.linear(torch.tanh(F.linear(h, sd[f"{p}.1.weight"], sd[f"{p}.1.bias"])), sd[f"{p}.3.weight"],
                    sd[f"{p}.3.bias"])


def window_keys(w):
    return lambda scores, i: [j for j in range(len(scores)) if j // w == i // w]


def topk_keys(k):
    return lambda scores, i: sorted(range(len(scores)), key=lambda j: -scores[j])[:k]


def independent(sd: dict, base: torch.Tensor, alpha: float) -> list[torch.Tensor]:
    """Eqs. 1-3 of 000 written out."""
    L = "levels"
    skip = lambda l, x: F.linear(x, sd[f"{L}.{l}.skip.weight"], sd[f"{L}.{l}.skip.bias"])
    a1 = attention_by_hand(sd, f"{L}.0.attn", base + sd[f"{L}.0.pos"], 2, window_keys(4))
    t1 = base + alpha * sd[f"{L}.0.scale"] * rho(sd, f"{L}.0.rho", a1)  # Eq. 1
    a2 = attention_by_hand(sd, f"{L}.1.attn", t1 + sd[f"{L}.1.pos"] + skip(1, base), 2, topk_keys(8))
    t2 = t1 + alpha * sd[f"{L}.1.scale"] * rho(sd, f"{L}.1.rho", a2)  # Eq. 2
    a3 = attention_by_hand(sd, f"{L}.2.attn", t2 + sd[f"{L}.2.pos"] + skip(2, base), 2, topk_keys(4))
    t3 = t2 + alpha * sd[f"{L}.2.scale"] * rho(sd, f"{L}.2.rho", a3)  # Eq. 3
    return [base, t1, t2, t3]


@pytest.mark.parametrize("alpha", [1.0, 0.35])
def test_levels_equal_eqs_1_to_4(refiner, base, alpha):
    sd = {k: v.detach() for k, v in refiner.state_dict().items()}
    with torch.no_grad():
        out = refiner(base, alpha=alpha)
    assert out.shape == (3, 4, CFG.tokens, CFG.dim)
    for level, want in enumerate(independent(sd, base, alpha)):
        assert torch.allclose(out[:, level], want, atol=2e-5), f"level {level}"
    # every level really corrects the one before it
    for level in range(1, 4):
        assert (out[:, level] - out[:, level - 1]).abs().max() > 1e-3


def test_alpha_zero_is_the_identity_on_base_tokens(refiner, base):
    """Phase 1 of A.1 (000): alpha = 0, every level is exactly T_base (a file without refiner = MS-Diffusion)."""
    with torch.no_grad():
        out = refiner(base, alpha=0.0)
        refiner.alpha.fill_(0.0)
        stored = refiner(base)
    for level in range(4):
        assert torch.equal(out[:, level], base) and torch.equal(stored[:, level], base)


def test_corrections_are_bounded_by_the_tanh(refiner):
    """Eq. 4 of 000: |Delta T_l| <= alpha |s_l| (sum_j |W2_ij| + |b2_i|), however large the input."""
    huge = torch.randn(2, CFG.tokens, CFG.dim, generator=torch.Generator().manual_seed(5)) * 1e4
    with torch.no_grad():
        out = refiner(huge, alpha=0.8)
    for l in range(3):
        lv = refiner.levels[l]
        w2, b2 = lv.rho[3].weight, lv.rho[3].bias
        bound = 0.8 * lv.scale.abs() * (w2.abs().sum(1) + b2.abs())
        delta = (out[:, l + 1] - out[:, l]).abs()
        assert (delta <= bound * (1 + 1e-5) + 1e-3).all()
        # the bound is nearly reached: the tanh saturates, so a correction sits close to it somewhere
        assert (delta / bound).max() > 0.3


def test_window_and_topk_masks():
    """Eq. 1: windows are blocks of w tokens; Eqs. 2-3: exactly k keys per query, the largest scores."""
    wm = window_mask(10, 4)
    for i in range(10):
        assert [j for j in range(10) if wm[i, j]] == [j for j in range(10) if j // 4 == i // 4]
    scores = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(6))
    for k in (8, 4, 1):
        keep = topk_mask(scores, k)
        assert (keep.sum(-1) == k).all()
        kept_min = scores.masked_fill(~keep, float("inf")).amin(-1)
        dropped_max = scores.masked_fill(keep, float("-inf")).amax(-1)
        assert (kept_min > dropped_max).all()
    assert topk_mask(scores, 99).all()  # k beyond the token count keeps everything


def test_sparse_attention_ignores_the_dropped_keys():
    """Eqs. 2-3: bumping key j's value changes exactly the queries whose top-k holds j (true sparsity)."""
    torch.manual_seed(7)
    attn = LevelAttention(CFG.dim, 1).eval()
    x = torch.randn(1, CFG.tokens, CFG.dim)
    j = 5
    with torch.no_grad():
        scores = attn.to_q(x) @ attn.to_k(x).transpose(1, 2)
        keeps_j = topk_mask(scores, 4)[0, :, j]  # [M]: which queries keep key j
        assert keeps_j.any() and not keeps_j.all()
        before = attn(x, topk=4)
        bump = torch.full((1, 1, CFG.dim), 100.0)
        hook = attn.to_v.register_forward_hook(lambda _m, _i, out: out.index_add(1, torch.tensor([j]), bump))
        after = attn(x, topk=4)  # only key j's value moved (the scores are untouched)
        hook.remove()
    changed = (after - before).abs().amax(-1)[0] > 1e-4
    assert torch.equal(changed, keeps_j)


def test_init_scale_shapes_and_per_subject_independence():
    m = ProgressiveRefiner(CFG).eval()
    assert [float(lv.scale.detach()) for lv in m.levels] == [pytest.approx(INIT_SCALE)] * 3
    assert m.levels[0].skip is None and m.levels[1].skip is not None and m.levels[2].skip is not None
    assert [tuple(lv.pos.shape) for lv in m.levels] == [(1, CFG.tokens, CFG.dim)] * 3
    x = torch.randn(3, CFG.tokens, CFG.dim)
    with torch.no_grad():
        together, alone = m(x), m(x[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-6)
    with pytest.raises(ValueError, match=r"expects tokens \[N, 12, 24\], got \(3, 8, 24\)"):
        m(torch.randn(3, 8, 24))
