"""Timestep routing (Sec. 3.3 of 000, Eqs. 5-6), the static and manual modes, and sigma -> t with ComfyUI's own
SDXL noise schedule, against independent computations with Python's math."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_troupe.models.sdxl.router import (
    CENTRES,
    TAU,
    TimestepRouter,
    gate_tokens,
    initial_anchor_logits,
    parse_schedule,
    route,
    router_time,
)


def softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def eq5(t: float, logits: list[list[float]]) -> list[float]:
    """Eq. 5 of 000: w(t) = sum_k exp(-(t - c_k)^2 / tau^2) softmax(theta_k), c = 0.95, 0.65, 0.2, tau = 0.3."""
    w = [0.0] * len(logits[0])
    for c, theta in zip((0.95, 0.65, 0.2), logits):
        phi = math.exp(-((t - c) ** 2) / 0.3 ** 2)
        w = [a + phi * b for a, b in zip(w, softmax(theta))]
    return w


@pytest.mark.parametrize("t", [0.0, 0.2, 0.4, 0.65, 0.8, 0.95, 0.999])
def test_rbf_weights_equal_eq_5(t):
    router = TimestepRouter(4)
    with torch.no_grad():
        router.anchor_logits.copy_(torch.tensor([[0.3, -1.2, 2.0, 0.1], [1.0, 0.5, -0.5, 0.0], [-2.0, 0.7, 0.2, 1.4]]))
    want = eq5(t, router.anchor_logits.tolist())
    got = router(t)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert route(t, 4, "learned", router).tolist() == pytest.approx(want, abs=1e-6)


def test_constants_and_anchor_initialisation():
    """Sec. 3.3 of 000: anchors favour T_base early (0.95), balanced mid (0.65), T3 late (0.2)."""
    assert CENTRES == (0.95, 0.65, 0.2) and TAU == 0.3
    theta = initial_anchor_logits(4)
    early, mid, late = (softmax(row) for row in theta.tolist())
    assert early == sorted(early, reverse=True) and early[0] > 0.5
    assert mid == pytest.approx([0.25] * 4)
    assert late == sorted(late) and late[3] > 0.5
    router = TimestepRouter(4)
    assert torch.equal(router.anchor_logits.detach(), theta)
    w_start, w_end = router(0.999).detach(), router(0.0).detach()
    assert int(w_start.argmax()) == 0 and int(w_end.argmax()) == 3
    # Eq. 5 as printed is not normalised: the gates' sum follows the kernels
    assert float(w_start.sum()) == pytest.approx(sum(math.exp(-((0.999 - c) ** 2) / 0.09) for c in CENTRES), abs=1e-6)


def test_gated_tokens_are_eq_6():
    """Eq. 6 of 000: Concat_i(w_i(t) * T_i), level-major, as the UNet sees them."""
    levels = torch.randn(2, 4, 3, 5)
    w = torch.tensor([0.9, 0.5, 0.2, 0.05])
    out = gate_tokens(levels, w)
    want = torch.cat([w[i] * levels[:, i] for i in range(4)], dim=1)
    assert out.shape == (2, 12, 5) and torch.allclose(out, want)


def test_static_and_single_level_routing():
    """A.2 of 000: static = 25% each; one level (no refiner or refinement off) = weight 1 = MS-Diffusion."""
    assert route(0.3, 4, "static").tolist() == [0.25] * 4
    assert route(0.3, 1, "learned", None).tolist() == [1.0]
    assert route(0.9, 1, "static").tolist() == [1.0]
    with pytest.raises(ValueError, match="learned routing needs router weights"):
        route(0.5, 4, "learned", None)
    with pytest.raises(ValueError, match="routing mode must be one of learned, static, manual"):
        route(0.5, 4, "rbf")


def test_manual_schedule_is_linear_between_knots_and_constant_outside():
    text = "1.0: 1,0,0,0; 0.5: 0.25, 0.25, 0.25, 0.25;\n 0.1: 0,0,0.5,0.5"
    sched = parse_schedule(text, 4)
    assert [k[0] for k in sched.knots] == [0.1, 0.5, 1.0]
    assert route(0.75, 4, "manual", schedule=text).tolist() == pytest.approx([0.625, 0.125, 0.125, 0.125])
    assert route(0.3, 4, "manual", schedule=sched).tolist() == pytest.approx([0.125, 0.125, 0.375, 0.375])
    assert route(0.0, 4, "manual", schedule=sched).tolist() == pytest.approx([0, 0, 0.5, 0.5])
    assert route(0.7, 4, "manual", schedule="0.2,0.3,0.4,0.1").tolist() == pytest.approx([0.2, 0.3, 0.4, 0.1])
    # one string serves refinement on and off: with one level the base weight is used
    assert route(0.75, 1, "manual", schedule=text).tolist() == pytest.approx([0.625])


@pytest.mark.parametrize("text, message", [
    ("", "the manual schedule is empty"),
    ("1.0: a,b,c,d", "is not numbers"),
    ("1.0: 1,0,0", "has 3 weights; this adapter has 4 levels"),
    ("1.5: 1,0,0,0", r"t must be in \[0, 1\]"),
    ("0.5: 1,-1,0,0", "must be finite and >= 0"),
    ("0.5: 1,0,0,0; 0.5: 0,0,0,1", "two entries have the same t"),
    ("1,0,0,0; 0.5: 0,0,0,1", "has no 't:'"),
])
def test_bad_schedules_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(text, 4)


def test_router_time_uses_the_model_timestep():
    """t = timestep / 1000 with ComfyUI's SDXL schedule: the largest sigma is t = 0.999, the smallest t = 0."""
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    import comfy.model_sampling
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL({"adm_in_channels": 2816, "context_dim": 2048, "model_channels": 32,
                                       "use_linear_in_transformer": True, "transformer_depth": [0, 0, 1, 1, 1, 1]})

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    ms = Sampling(cfg)
    sig = ms.sigmas
    assert float(router_time(ms, sig[-1])) == pytest.approx(0.999)
    assert float(router_time(ms, sig[0])) == pytest.approx(0.0)
    assert router_time(ms, sig[[499, 250]]).tolist() == pytest.approx([0.499, 0.25])


# --------------------------------------------------------------------------- TroupeRoutingPreview


@pytest.fixture(scope="module")
def preview():
    from fixtures.tiny_models import ensure_comfy, tiny_sdxl

    ensure_comfy()
    from comfyui_troupe.nodes import sdxl_routing

    return sdxl_routing, tiny_sdxl()


def test_preview_gates_follow_the_samplers_steps(preview):
    """Each step's t is the model's discrete timestep of that step's sigma (argmin |log sigma - log sigma_i|) / 1000,
    and its gates are Eq. 5 of 000 with the initial anchors; dpm_2 drops the penultimate sigma like KSampler."""
    node, model = preview
    ms = model.get_model_object("model_sampling")
    log_sigmas = ms.log_sigmas.tolist()
    theta = initial_anchor_logits(4).tolist()
    for sampler, scheduler, steps, denoise in (("euler", "normal", 12, 1.0), ("dpm_2", "karras", 9, 1.0),
                                               ("euler", "simple", 10, 0.5)):
        weights, times = node.routing_over_steps(model, sampler, scheduler, steps, denoise, "learned", "", True)
        sigmas = node.step_sigmas(model, sampler, scheduler, steps, denoise)
        assert weights.shape == (steps, 4) and times.shape == (steps,) and sigmas.shape == (steps,)
        for s in range(steps):
            ls = math.log(float(sigmas[s]))
            t = min(range(1000), key=lambda i: abs(ls - log_sigmas[i])) / 1000
            assert float(times[s]) == pytest.approx(t)
            assert weights[s].tolist() == pytest.approx(eq5(t, theta), abs=1e-6)
        if denoise == 1.0:
            assert float(times[0]) == pytest.approx(0.999)
        else:
            assert float(times[0]) < 0.6  # half the schedule: starts mid-way
    # the discarded penultimate sigma: dpm_2's last step is not the plain schedule's last sigma
    plain = node.comfy.samplers.calculate_sigmas(ms, "karras", 9)
    assert not torch.allclose(node.step_sigmas(model, "dpm_2", "karras", 9, 1.0), plain[:-1])


def test_preview_modes_adapter_and_chart(preview):
    from fixtures.sdxl_adapters import ms_diffusion_state_dict

    from comfyui_troupe.models.adapter_file import Adapter, detect_and_load
    from comfyui_troupe.models.layout.preview import hex_rgb
    from comfyui_troupe.models.sdxl.formats import FAMILY
    from comfyui_troupe.models.sdxl.routing_chart import LEVEL_COLOURS, point, y_top

    node, model = preview
    w, t = node.routing_over_steps(model, "euler", "normal", 8, 1.0, "static", "", True)
    assert torch.equal(w, torch.full((8, 4), 0.25))
    w, t = node.routing_over_steps(model, "euler", "normal", 8, 1.0, "manual", "1: 1,0,0,0; 0: 0,0,0,1", True)
    assert w[:, 0].tolist() == pytest.approx(t.tolist()) and w[:, 3].tolist() == pytest.approx((1 - t).tolist())
    w, _ = node.routing_over_steps(model, "euler", "normal", 8, 1.0, "learned", "", False)
    assert torch.equal(w, torch.ones(8, 1))  # refinement off: base only, weight 1
    ms_adapter = detect_and_load(ms_diffusion_state_dict(0), [FAMILY])
    w, _ = node.routing_over_steps(model, "euler", "normal", 8, 1.0, "learned", "", True, ms_adapter)
    assert torch.equal(w, torch.ones(8, 1))  # no refiner in an MS-Diffusion file
    with pytest.raises(ValueError, match="TroupeRoutingPreview: input 'schedule': manual schedule entry '1: 1,0' "
                                         "has 2 weights"):
        node.routing_over_steps(model, "euler", "normal", 8, 1.0, "manual", "1: 1,0", True)
    flux = Adapter(family="flux", format="dynaip", module=None)
    with pytest.raises(ValueError, match="TroupeRoutingPreview: input 'adapter': got a FLUX adapter"):
        node.routing_over_steps(model, "euler", "normal", 8, 1.0, "learned", "", True, flux)
    # the chart: each level's line passes through its colour at its weight of the first and last step
    w, t = node.routing_over_steps(model, "euler", "normal", 10, 1.0, "learned", "", True)
    chart = node.draw_routing(w, t, "test")
    assert chart.shape == (1, 380, 760, 3) and chart.dtype == torch.float32
    img = (chart[0] * 255).round().to(torch.int64)
    top = y_top(w)
    for step in (0, 9):
        lv = int(w[step].argmax())  # the top line at that step is drawn last among those near it? check its colour
        x, y = point(step, float(w[step, lv]), 10, top)
        colour = torch.tensor(hex_rgb(LEVEL_COLOURS[lv]))
        patch = img[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2].reshape(-1, 3)
        assert ((patch - colour).abs().sum(-1) < 30).any(), (step, lv)
    assert node.weights_table(w, t).splitlines()[0].startswith("step   0  t=0.999  w=[")
    assert node.TroupeRoutingPreview.validate_inputs("euler", "karras", "manual") is True
    assert "input 'sampler_name': unknown value 'eulr'" in node.TroupeRoutingPreview.validate_inputs(
        "eulr", "karras", "learned")
