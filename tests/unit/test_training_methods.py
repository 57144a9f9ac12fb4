"""The training methods' maths, each against an independent computation (R^3-Adapter Eqs. 1-11 and A.1,
MultiPersona-Align Eqs. 5-8), and the reproducible data stream of the trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.sdxl_adapters import ms_diffusion_adapter, r3_adapter
from fixtures.tiny_models import ensure_comfy

from comfyui_troupe.models.layout.layout import Layout, Region
from comfyui_troupe.models.sdxl.patch import RegionalAttentionPatch, RegionalParams
from comfyui_troupe.training.sdxl import (
    AlignmentCapture,
    OrthogonalProjection,
    Sample,
    SdxlTrainModule,
    TrainableProjection,
    TrainingAttention,
    align_modules,
    lcm_context,
    objective_target,
    orthogonal,
    phase_schedule,
)
from comfyui_troupe.training.trainer import lr_lambda, positions, record_index

# --------------------------------------------------------------------------- Eq. 7 of R^3-Adapter


@pytest.mark.parametrize(("rows", "cols"), [(512, 1024), (1280, 512), (512, 64), (640, 512)])
def test_orthogonal_matrices_have_orthonormal_rows_or_columns(rows, cols):
    w = orthogonal(rows, cols, torch.Generator().manual_seed(0)).double()
    assert w.shape == (rows, cols)
    gram = w @ w.T if rows <= cols else w.T @ w
    assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-5)


def test_frozen_projection_is_w2_w1_with_no_parameters():
    p = OrthogonalProjection(1024, widths=(640, 1280, 1280), hidden=512, seed=3)
    assert list(p.parameters()) == []  # buffers only: no optimiser can move them, no gradient reaches them
    assert {n for n, _ in p.named_buffers()} == {"w1", "w2_640", "w2_1280"}
    f = torch.randn(3, 1024)
    expected = f.numpy().astype(np.float64) @ p.w1.numpy().T.astype(np.float64) @ p.w2_1280.numpy().T
    assert np.allclose(p(f, 1280).numpy(), expected, atol=1e-4)
    # a semi-orthogonal W1 (512 x 1024) keeps the norm of its row space; W2 (1280 x 512) keeps every norm
    g = torch.randn(512, dtype=torch.float64)
    assert torch.allclose((p.w2_1280.double() @ g).norm(), g.norm(), rtol=1e-5)


# --------------------------------------------------------------------------- Eqs. 8-10 / 5-6, against numpy


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _sample(n: int, dino: int, seed: int) -> Sample:
    g = torch.Generator().manual_seed(seed)
    layout = Layout(64, 64, tuple(Region(box=(0.1 * i, 0.1, 0.1 * i + 0.4, 0.9)) for i in range(n)))
    return Sample(latent=torch.zeros(4, 8, 8), context=torch.zeros(77, 8), pooled=torch.zeros(8), adm_size=(64, 64, 0, 0),
                  layout=layout, image_features=torch.zeros(n, 4, 8), phrases=torch.zeros(n, 8),
                  dino_cls=torch.randn(n, dino, generator=g), dino_patch_mean=torch.randn(dino, generator=g),
                  noise=torch.zeros(4, 8, 8), timestep=0, drop_image=False)


@pytest.mark.parametrize("method", ["r3", "multipersona"])
def test_alignment_losses_match_numpy(method):
    torch.manual_seed(0)
    adapter = r3_adapter(0) if method == "r3" else ms_diffusion_adapter(0)
    module = SdxlTrainModule(adapter, method, dino_dim=16, align_widths=(32, 48), projection_width=24).eval()
    samples = [_sample(2, 16, 1), _sample(3, 16, 2)]
    capture = AlignmentCapture(align_modules("down+mid"))
    g = torch.Generator().manual_seed(5)
    layers = {("input", 7, 0): 32, ("middle", 0, 0): 48}
    for key, width in layers.items():
        capture.cross_feats[key] = [torch.randn(2, width, generator=g), torch.randn(3, width, generator=g)]
        capture.self_feats[key] = torch.randn(2, width, generator=g)
    cross, self_ = module.alignment(capture, samples, "cpu")
    proj = module.projection
    want_cross, want_self = [], []
    for key, width in layers.items():
        for s, h in zip(samples, capture.cross_feats[key]):
            targets = proj(s.dino_cls, width, "cross").detach().numpy()
            # Eq. 8: 1/N sum_j [1 - cos(mean(h_cross,j), P(f_j^CLS))]
            want_cross.append(np.mean([1 - _cos(h[j].numpy(), targets[j]) for j in range(len(h))]))
        for b, s in enumerate(samples):
            target = proj(s.dino_patch_mean[None], width, "self").detach().numpy()[0]
            want_self.append(1 - _cos(capture.self_feats[key][b].numpy(), target))  # Eq. 9
    assert float(cross.detach()) == pytest.approx(np.mean(want_cross), abs=1e-5)
    assert float(self_.detach()) == pytest.approx(np.mean(want_self), abs=1e-5)


def test_multipersona_projectors_get_gradients_and_r3_projection_none():
    torch.manual_seed(0)
    samples = [_sample(2, 16, 1)]
    for method in ("multipersona", "r3"):
        adapter = ms_diffusion_adapter(0) if method == "multipersona" else r3_adapter(0)
        module = SdxlTrainModule(adapter, method, dino_dim=16, align_widths=(32,), projection_width=24)
        capture = AlignmentCapture(align_modules("mid"))
        h = torch.randn(2, 32, requires_grad=True)
        capture.cross_feats[("middle", 0, 0)] = [h]
        capture.self_feats[("middle", 0, 0)] = torch.randn(1, 32, requires_grad=True)
        cross, self_ = module.alignment(capture, samples, "cpu")
        (cross + self_).backward()
        assert h.grad is not None and h.grad.abs().sum() > 0  # the diffusion features always get a gradient
        params = list(module.projection.parameters())
        if method == "multipersona":  # Eq. 7 of MultiPersona-Align: trainable, both Pi_cross and Pi_self
            assert isinstance(module.projection, TrainableProjection)
            assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        else:
            assert params == []


# --------------------------------------------------------------------------- A.1 of R^3-Adapter


def test_phase_schedule_of_r3_and_multipersona():
    assert [phase_schedule(s, "r3", 10, 4, 0.01) for s in (0, 9)] == [(0.0, 0.0), (0.0, 0.0)]
    assert [phase_schedule(s, "r3", 10, 4, 0.01)[0] for s in (10, 11, 12, 13, 14, 100)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert phase_schedule(10, "r3", 10, 4, 0.01)[1] == 0.01
    assert phase_schedule(9, "multipersona", 10, 4, 0.01) == (0.0, 0.0)
    assert phase_schedule(10, "multipersona", 10, 4, 0.01) == (0.0, 0.01)
    assert phase_schedule(500, "ms-diffusion", 10, 4, 0.01) == (0.0, 0.0)


def test_phase_one_refiner_output_equals_its_input_exactly():
    adapter = r3_adapter(0).train()
    feats = torch.randn(2, 5, 64)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    phrases = torch.randn(2, 768)
    levels = adapter.subject_tokens(feats, boxes, phrases, alpha=0.0)
    assert levels.shape[1] == 4
    for level in range(1, 4):
        assert torch.equal(levels[:, level], levels[:, 0])  # T_l = T_base + 0 * s_l * rho_l(...) (Eqs. 1-3)
    assert not torch.equal(adapter.subject_tokens(feats, boxes, phrases, alpha=1.0)[:, 3], levels[:, 0])


def test_refiner_learning_rate_is_zero_through_phase_one():
    f = lr_lambda("constant", warmup=0, total=100, delay=10)
    assert [f(s) for s in (0, 9, 10, 50)] == [0.0, 0.0, 1.0, 1.0]
    cos = lr_lambda("cosine", warmup=10, total=110)
    assert cos(0) == pytest.approx(0.1) and cos(10) == pytest.approx(1.0) and cos(110) == pytest.approx(0.0)


# --------------------------------------------------------------------------- the objective and the attention


@pytest.mark.parametrize("kind", ["EPS", "V_PREDICTION"])
def test_objective_target_denoises_to_x0_through_comfyui(kind):
    """ComfyUI's own calculate_denoised, fed the target as the model output, must return x0 exactly."""
    ensure_comfy()
    import comfy.model_sampling

    sampling = getattr(comfy.model_sampling, kind)()
    sampling.sigma_data = 1.0  # what ModelSamplingDiscrete sets for SDXL
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    target = objective_target(kind == "V_PREDICTION", sigma, x0, eps)
    x = x0 + eps * sigma[:, None, None, None]
    assert torch.allclose(sampling.calculate_denoised(sigma, target, x), x0, atol=1e-4)


def test_training_attention_adds_the_inference_patch_term():
    """The trainable patch computes the very numbers of the patch the nodes install; a dropped image adds none."""
    adapter = r3_adapter(0)
    layout = Layout(64, 64, (Region(box=(0.0, 0.0, 0.6, 1.0)), Region(box=(0.4, 0.0, 1.0, 1.0))))
    feats = torch.randn(2, 5, 64)
    boxes = torch.tensor(layout.boxes)
    phrases = torch.randn(2, 768)
    tokens = adapter.subject_tokens(feats, boxes, phrases)
    params = RegionalParams()
    inference = RegionalAttentionPatch(adapter, tokens, layout, params)
    trainable = RegionalAttentionPatch(adapter, tokens, layout, params, trainable=True)
    attn = TrainingAttention([trainable, None], [5.0, 5.0], None)
    q = torch.randn(2, 64, 64)
    k = v = torch.randn(2, 77, 64)
    opts = {"n_heads": 2, "block": ("input", 4), "block_index": 0, "original_shape": [2, 4, 8, 8]}
    out = attn(q, k, v, dict(opts))
    text = attn.attention(q, k, v, 2)
    with torch.no_grad():
        want = inference.image_attention(q[:1], ("input", 4, 0), 8, 8, 5.0, 2)
    assert torch.allclose(out[:1] - text[:1], want, atol=1e-5)
    assert torch.equal(out[1:], text[1:])
    out.sum().backward()  # and the adapter's K/V get their gradient through it
    to_k, _ = adapter.kv(("input", 4, 0))
    assert to_k.weight.grad is not None and to_k.weight.grad.abs().sum() > 0


def test_contexts_of_different_lengths_batch_as_comfyui_does():
    a, b = torch.randn(77, 4), torch.randn(154, 4)
    out = lcm_context([a, b])
    assert out.shape == (2, 154, 4) and torch.equal(out[0, 77:], a) and torch.equal(out[1], b)


# --------------------------------------------------------------------------- the data stream


def test_global_batch_is_the_same_for_any_number_of_processes():
    one = positions(step=3, micro=1, grad_accum=2, batch_size=4, rank=0, world=1)
    two = positions(3, 1, 2, 2, 0, 2) + positions(3, 1, 2, 2, 1, 2)
    four = [p for r in range(4) for p in positions(3, 1, 2, 1, r, 4)]
    assert one == two == four == list(range(28, 32))


def test_each_epoch_visits_every_record_once_in_a_seeded_order():
    n = 7
    for epoch in range(3):
        order = [record_index(5, epoch * n + i, n) for i in range(n)]
        assert sorted(order) == list(range(n))
    assert [record_index(5, i, n) for i in range(n)] != [record_index(6, i, n) for i in range(n)]
    assert [record_index(5, i, n) for i in range(n)] == [record_index(5, i, n) for i in range(n)]
