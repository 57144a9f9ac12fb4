"""Timestep-adaptive routing of the refinement levels (Sec. 3.3 of 000, Eqs. 5-6) and the other routing modes.

Time: ``t = timestep / 1000`` in [0, 1], the model's discrete timestep (0..999) scaled, so t near 1 is the
start of sampling (pure noise) and t = 0 the end. ``router_time`` converts a sampler's sigma.

    phi_k(t) = exp(-(t - c_k)^2 / tau^2),  c = (0.95, 0.65, 0.2),  tau = 0.3
    w(t) = sum_k phi_k(t) * softmax(theta_k)                                     (Eq. 5)
    T_gated = Concat_i(w_i(t) * T_i)                                             (Eq. 6)

Eq. 5 is used as printed: the kernels are not normalised, so sum_i w_i(t) varies with t (about 0.65 at
t = 0, 1.37 at t = 0.95). Modes: ``learned`` (Eq. 5), ``static`` (1/L each: A.2 of 000, 25% for 4 levels),
``manual`` (a schedule string, see ``parse_schedule``).

Checkpoint names (under ``router.`` in an R^3 file): ``anchor_logits`` [3, L] (theta_k), ``centres`` [3],
``tau`` [].
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

CENTRES = (0.95, 0.65, 0.2)  # early, mid, late (Sec. 3.3 of 000)
TAU = 0.3
NUM_TIMESTEPS = 1000
ANCHOR_SPREAD = 1.5  # initial logits: early +1.5 .. -1.5 over the levels (favours T_base), late the reverse
MODES = ("learned", "static", "manual")


def router_time(model_sampling, sigma: torch.Tensor | float) -> torch.Tensor:
    """The router's t in [0, 1] for a sampler sigma (a float or a tensor of them): the model's timestep (0..999
    for SDXL) divided by 1000, in the shape of ``sigma``."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return (model_sampling.timestep(s.reshape(-1)).float() / NUM_TIMESTEPS).reshape(s.shape)


def rbf_kernels(t: torch.Tensor, centres: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Eq. 5 of 000: phi_k(t) = exp(-(t - c_k)^2 / tau^2) for every anchor, shape [..., K]."""
    return torch.exp(-((t[..., None] - centres) ** 2) / tau ** 2)


def initial_anchor_logits(levels: int = 4, spread: float = ANCHOR_SPREAD) -> torch.Tensor:
    """Sec. 3.3 of 000: theta at init [3, L]: early anchor favours T_base, mid is uniform, late favours T_L."""
    ramp = torch.linspace(spread, -spread, levels) if levels > 1 else torch.zeros(1)
    return torch.stack((ramp, torch.zeros(levels), -ramp))


class TimestepRouter(nn.Module):
    """Eq. 5 of 000: gate weights w(t) [..., L] from RBF kernels over three learned anchor distributions."""

    def __init__(self, levels: int = 4, centres: Sequence[float] = CENTRES, tau: float = TAU, *, dtype=None,
                 device=None):
        super().__init__()
        self.anchor_logits = nn.Parameter(initial_anchor_logits(levels).to(dtype=dtype or torch.float32,
                                                                           device=device))
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32, device=device))
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32, device=device))

    @property
    def levels(self) -> int:
        return int(self.anchor_logits.shape[-1])

    def anchors(self) -> torch.Tensor:
        """softmax(theta_k) per anchor, [3, L]."""
        return self.anchor_logits.float().softmax(-1)

    def forward(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.centres.device)
        return rbf_kernels(t, self.centres.float(), self.tau.float()) @ self.anchors()


def gate_tokens(levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 6 of 000: levels [N, L, M, C] and w [L] -> Concat_i(w_i * T_i) as [N, L * M, C]."""
    return (levels * weights.to(levels)[None, :, None, None]).flatten(1, 2)


# --------------------------------------------------------------------------- manual schedules


@dataclass(frozen=True)
class Schedule:
    """A manual routing schedule: knots (t, weights[L]) sorted by t, linear in between, constant outside."""

    knots: tuple[tuple[float, tuple[float, ...]], ...]

    @property
    def levels(self) -> int:
        return len(self.knots[0][1])

    def __call__(self, t: float) -> torch.Tensor:
        ts = [k[0] for k in self.knots]
        ws = [k[1] for k in self.knots]
        if t <= ts[0]:
            return torch.tensor(ws[0])
        if t >= ts[-1]:
            return torch.tensor(ws[-1])
        i = next(j for j in range(1, len(ts)) if t <= ts[j])
        f = (t - ts[i - 1]) / (ts[i] - ts[i - 1])
        return torch.tensor([a + f * (b - a) for a, b in zip(ws[i - 1], ws[i])])


SCHEDULE_HELP = ("'t: w0, w1, w2, w3' entries separated by ';' (t = 1 at the start of sampling, 0 at the end; "
                 "linear between entries, constant outside), e.g. '1.0: 1,0,0,0; 0.5: 0.25,0.25,0.25,0.25; "
                 "0.0: 0,0,0,1', or just 'w0, w1, w2, w3' for the whole run")


def parse_schedule(text: str, levels: int) -> Schedule:
    """A manual schedule string -> ``Schedule`` of ``levels`` weights per knot (see ``SCHEDULE_HELP``).

    With one level (no refiner, or refinement off) entries of 4 weights are accepted and their first (T_base)
    weight is used, so one string serves both settings.
    """
    entries = [e.strip() for e in (text or "").replace("\n", ";").split(";") if e.strip()]
    if not entries:
        raise ValueError(f"the manual schedule is empty; write {SCHEDULE_HELP}")
    knots = []
    for entry in entries:
        head, sep, tail = entry.rpartition(":")
        try:
            t = float(head) if sep else None
            weights = [float(x) for x in tail.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"manual schedule entry {entry!r} is not numbers; write {SCHEDULE_HELP}") from None
        if not sep and len(entries) > 1:
            raise ValueError(f"manual schedule entry {entry!r} has no 't:'; with several entries each needs "
                             f"its t; write {SCHEDULE_HELP}")
        if levels == 1 and len(weights) == 4:
            weights = weights[:1]
        if len(weights) != levels:
            names = "T_base, T1, T2, T3" if levels == 4 else "T_base" if levels == 1 else f"{levels} levels"
            raise ValueError(f"manual schedule entry {entry!r} has {len(weights)} weights; this adapter has "
                             f"{levels} level{'s' if levels > 1 else ''} ({names})")
        if t is not None and not (0.0 <= t <= 1.0):
            raise ValueError(f"manual schedule entry {entry!r}: t must be in [0, 1] (1 = start of sampling)")
        if any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"manual schedule entry {entry!r}: weights must be finite and >= 0")
        knots.append((0.0 if t is None else t, tuple(weights)))
    knots.sort(key=lambda k: k[0])
    if len({k[0] for k in knots}) != len(knots):
        raise ValueError("manual schedule: two entries have the same t; give each t once")
    return Schedule(tuple(knots))


# --------------------------------------------------------------------------- modes


def route(t: float, levels: int, mode: str = "learned", router: TimestepRouter | None = None,
          schedule: str | Schedule | None = None) -> torch.Tensor:
    """Gate weights [L] at t for a routing mode: ``learned`` (Eq. 5 of 000; 1 for a single level),
    ``static`` (1/L each, A.2 of 000), ``manual`` (a schedule)."""
    if mode not in MODES:
        raise ValueError(f"routing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "manual":
        sched = schedule if isinstance(schedule, Schedule) else parse_schedule(schedule or "", levels)
        return sched(float(t)).float()
    if mode == "static" or levels == 1:
        return torch.full((levels,), 1.0 / levels)
    if router is None:
        raise ValueError("learned routing needs router weights; this adapter has none: use 'static' or 'manual'")
    if router.levels != levels:
        raise ValueError(f"the router gates {router.levels} levels but the tokens have {levels}")
    with torch.no_grad():
        return router(float(t)).float().cpu()
