"""Attention-map recording: per-subject attention mass per image token, as running sums at each token grid.

Axis legend: B batch (cond rows), H heads, P image tokens of one grid (h * w), T subject tokens, N subjects.

For an image token p the mass given to subject i is ``a_i(p) = mean_H sum_{t in T_i} softmax(q_p K^T / sqrt(d))_t``
over the softmax the patch itself computes (one per pixel group in joint attention, one per subject in separate
attention and DynaIP's Eq. 9, the block's joint attention over [text | image | references] with Eq. 6 of 002's
mask for the reference branch), times the factor that multiplies that attention's output where it is a mask (M_i of
Eq. 9 of 004, the coverage of IP-Adapter's regional masks). The recorder keeps, per token grid (h, w), the running
sum of a [B, N, h * w] and a count of the calls added, never an attention matrix; the probabilities of one chunk of
rows exist only while that chunk is summed. A patch finds the run's recorder in its run dict (``RUN_KEY``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RUN_KEY = "troupe_attention_recorder"  # the run dict's key of the sampling run's AttentionRecorder
PARTS: tuple[str, ...] = ("down", "mid", "up", "double", "single")  # SDXL UNet parts, FLUX block kinds
BLOCK_CHOICES: tuple[str, ...] = ("all", "down", "mid", "up", "down+mid", "down+up", "double", "single")
CHUNK_ROWS = 256  # image tokens per softmax chunk: bounds the transient [B, H, rows, T] probabilities


@dataclass(frozen=True)
class RecordSettings:
    """Which blocks and which sigma window (sigma_end <= sigma <= sigma_start) are averaged into the maps."""

    blocks: str = "all"
    sigma_start: float = math.inf
    sigma_end: float = 0.0

    def __post_init__(self) -> None:
        if self.blocks not in BLOCK_CHOICES:
            raise ValueError(f"blocks must be one of {BLOCK_CHOICES}, got {self.blocks!r}")

    def wants(self, part: str, sigma: float) -> bool:
        """Whether a call in UNet part / FLUX block kind ``part`` at ``sigma`` is recorded."""
        in_blocks = self.blocks == "all" or part in self.blocks.split("+")
        return in_blocks and self.sigma_end <= sigma <= self.sigma_start


def subject_mass(q: torch.Tensor, k: torch.Tensor, subject_of_token: torch.Tensor, num_subjects: int,
                 bias: torch.Tensor | None = None, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mass [B, P, N] of softmax(q K^T / sqrt(d) + bias) per subject, mean over heads; q [B, H, P, d], k [H, T, d]
    or [B, H, T, d], bias [B, P, T] (an additive mask) or None.

    ``subject_of_token`` [T] gives each key's subject, -1 for keys of no subject (text, image); the softmax runs
    over all T keys (Eq. 2 of 004's CA, MS-Diffusion's joint softmax, or FLUX's joint attention with references);
    computed in float32, ``chunk`` rows at a time.
    """
    b, _, p, d = q.shape
    owner = subject_of_token.to(q.device).long()
    owner = torch.where(owner < 0, num_subjects, owner)
    one_hot = F.one_hot(owner, num_subjects + 1)[:, :num_subjects].float()  # [T, N]
    kf = k.float()
    pattern = "bhpd,htd->bhpt" if kf.ndim == 3 else "bhpd,bhtd->bhpt"
    out = q.new_zeros(b, p, num_subjects, dtype=torch.float32)
    for start in range(0, p, chunk):
        logits = torch.einsum(pattern, q[:, :, start:start + chunk].float(), kf) / math.sqrt(d)
        if bias is not None:
            logits = logits + bias[:, None, start:start + chunk].float()
        out[:, start:start + chunk] = torch.softmax(logits, dim=-1).mean(1) @ one_hot
    return out


class AttentionRecorder:
    """The running sums of one sampling run: per token grid (h, w), sum [B, N, h * w] and the number of calls."""

    def __init__(self, settings: RecordSettings) -> None:
        self.settings = settings
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def wants(self, part: str, sigma: float) -> bool:
        return self.settings.wants(part, sigma)

    def begin(self, grid: tuple[int, int], batch: int, num_subjects: int, device) -> torch.Tensor:
        """The sum buffer [B, N, P] of this grid for one call (a new call: count + 1); patches add into it."""
        h, w = grid
        key = (h, w)
        buf = self.sums.get(key)
        if buf is None or buf.shape[0] != batch or buf.shape[1] < num_subjects:
            grown = torch.zeros(batch, num_subjects, h * w, device=device)
            if buf is not None and buf.shape[0] == batch:
                grown[:, :buf.shape[1]] = buf.to(device)
            buf = self.sums[key] = grown
        self.counts[key] = self.counts.get(key, 0) + 1
        return buf

    def add(self, buf: torch.Tensor, mass: torch.Tensor, rows: torch.Tensor | None = None,
            subjects: torch.Tensor | None = None) -> None:
        """Add mass [B, P', N'] at token rows ``rows`` (None: all) for subjects ``subjects`` (None: 0..N'-1)."""
        m = mass.transpose(1, 2).to(buf.device, torch.float32)  # [B, N', P']
        cols = slice(None) if rows is None else rows.to(buf.device)
        if subjects is None:
            target = buf[:, :m.shape[1]]
            if rows is None:
                target += m
            else:
                target.index_add_(2, cols, m)
            return
        for j, s in enumerate(subjects.tolist()):
            if rows is None:
                buf[:, s] += m[:, j]
            else:
                buf[:, s].index_add_(1, cols, m[:, j])

    def maps(self, height: int, width: int) -> torch.Tensor | None:
        """Mean mass [B, N, height, width]: each grid's mean over its calls, resized (nearest) and weighted by calls."""
        if not self.sums:
            return None
        n = max(s.shape[1] for s in self.sums.values())
        b = next(iter(self.sums.values())).shape[0]
        total = torch.zeros(b, n, height, width)
        calls = 0
        for (h, w), s in self.sums.items():
            grid = s.detach().float().cpu().reshape(s.shape[0], s.shape[1], h, w)
            grid = F.pad(grid, (0, 0, 0, 0, 0, n - s.shape[1]))
            total += F.interpolate(grid, size=(height, width), mode="nearest")
            calls += self.counts[(h, w)]
        return total / max(calls, 1)


class Recording:
    """What TroupeAttentionMaps hands on: its settings and the recorder of the latest finished sampling run.

    Each run records into a recorder of its own (``start``), published only when the run ends without error
    (``finish``), so a re-run replaces the maps instead of adding to them and an interrupted run leaves the last
    finished one. ``runs`` counts the finished runs.
    """

    def __init__(self, settings: RecordSettings) -> None:
        self.settings = settings
        self.last: AttentionRecorder | None = None
        self.runs = 0

    def __deepcopy__(self, memo: dict) -> Recording:
        return self  # a handle: clones of the model record into the same one

    def start(self) -> AttentionRecorder:
        return AttentionRecorder(self.settings)

    def finish(self, recorder: AttentionRecorder) -> None:
        self.last = recorder
        self.runs += 1
