"""Shared by the benchmark scripts: peak resident-memory growth of a block of work (Linux /proc)."""
from __future__ import annotations

import ctypes
import os
import threading
import time

from typing_extensions import Self


def rss() -> int:
    """The process's resident-set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Give freed heap back to the OS, so that a following measurement sees only its own working memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Largest resident-set size seen while the block runs (sampled every 5 ms), minus the size at its start."""

    def __enter__(self) -> Self:
        trim()
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


# --------------------------------------------------------------------------- FLOP estimates (explicit formulas)
#
# One multiply-add counts as 2 FLOP. Softmax, norms, RoPE and element-wise work are left out: they are
# O(rows x width), small next to the products below, and the counts are compared with torch's own
# FlopCounterMode (which also counts only products) in tests/unit/test_bench.py.


def linear_flops(rows: int, fan_in: int, fan_out: int) -> float:
    """``rows`` vectors through a ``fan_in -> fan_out`` linear layer: 2 * rows * fan_in * fan_out."""
    return 2.0 * rows * fan_in * fan_out


def attention_flops(queries: int, keys: int, width: int) -> float:
    """Softmax attention of ``queries`` rows over ``keys`` keys at total width ``width`` (heads x head width):
    Q K^T (2 q k w) plus the weighted sum A V (2 q k w) = 4 q k w."""
    return 4.0 * queries * keys * width


def flux_block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """One FLUX block (double or single) over ``tokens`` joint tokens: the QKV (3 D^2), output (D^2) and MLP
    (2 r D^2) products of every token, 2 FLOP each, plus joint self-attention over all tokens.

    A double block has separate text and image weights, but every token still goes through one set:
    (3 + 1 + 2 r) D^2 x 2 = 24 D^2 per token at r = 4; a single block fuses the same products into linear1
    (3 D + r D outputs) and linear2 (D + r D inputs): also (4 + 2 r) D^2."""
    return linear_flops(tokens, width, int((4 + 2 * mlp_ratio) * width)) + attention_flops(tokens, tokens, width)


def flux_step_flops(image_tokens: int, text_tokens: int, width: int, double: int, single: int,
                    mlp_ratio: float = 4.0) -> float:
    """The blocks of one FLUX forward (embedders and final layer left out: under 0.1 % at these sizes)."""
    return (double + single) * flux_block_flops(image_tokens + text_tokens, width, mlp_ratio)


def kv_projection_flops(tokens: int, context: int, width: int, bias: bool = False) -> float:
    """K and V of ``tokens`` reference tokens of width ``context`` projected to ``width`` (2 linears)."""
    return 2 * linear_flops(tokens, context, width) + (2.0 * tokens * width if bias else 0.0)


def reference_self_cached_flops(query_rows: int, reference_tokens: int, width: int, blocks: int) -> float:
    """Steady-state extra work of the reference branch in ``self_cached`` mode per model call: with every
    block's reference K/V cached for the run, the only new products are the ``query_rows`` queries of each
    block attending to the extra ``reference_tokens`` keys (text and image queries: the joint attention
    runs [text | image] over [text | image | references]). Setup (the references' own pass) is not in it."""
    return blocks * attention_flops(query_rows, reference_tokens, width)


def reference_latent_flops(image_tokens: int, text_tokens: int, reference_tokens: int, width: int, blocks: int,
                           mlp_ratio: float = 4.0) -> float:
    """Extra work of ComfyUI's ``ReferenceLatent`` (FLUX Kontext): the reference tokens join the image tokens
    in every block at every step, so each block runs on n + R tokens instead of n (n = text + image)."""
    n = image_tokens + text_tokens
    return blocks * (flux_block_flops(n + reference_tokens, width, mlp_ratio) - flux_block_flops(n, width, mlp_ratio))


# --------------------------------------------------------------------------- counted FLOPs (torch's counter)


def flop_counter():
    """torch's ``FlopCounterMode`` (matmuls, convolutions) that also counts CPU scaled-dot-product attention,
    which it does not map on its own (its CUDA kernels it does)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={op: cpu_sdpa} if op is not None else {})


def counted_flops(fn) -> float:
    """FLOPs of the products ``fn()`` runs, counted by ``flop_counter()``."""
    counter = flop_counter()
    with counter:
        fn()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- interleaved rounds, one table


class Inside:
    """Seconds spent inside wrapped calls since the last ``reset`` (the added term of a patch): process CPU time by
    default, or another ``clock`` (``time.perf_counter``: wall time)."""

    def __init__(self, clock=time.process_time) -> None:
        self.clock = clock
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += self.clock() - t
                self.calls += 1
        return timed


class Config:
    """One configuration of a family: ``run(steps, tick)`` makes one sampling run of ``steps`` steps and calls
    ``tick()`` after each step (the sampler callback); ``inside``: the timer of its added term (None: the
    added work is not one separable call); ``flops``: the FLOP estimate of its added work per step (formula);
    ``cache``: a callable giving the bytes its per-run cache holds (None: nothing kept)."""

    def __init__(self, name: str, run, flops: float = 0.0, inside: Inside | None = None, cache=None,
                 formula: str = "", peer: bool = False) -> None:
        self.name, self.run, self.flops, self.inside, self.cache = name, run, flops, inside, cache
        self.formula, self.peer = formula, peer
        self.first: list[float] = []  # per round: CPU seconds of the run's first step
        self.steady: list[float] = []  # per round: median CPU seconds of the steady steps of that run
        self.wall: list[float] = []  # per round: median wall seconds of the steady steps
        self.inside_s: list[float] = []  # per round: CPU seconds inside the added term per steady step
        self.memory: list[int] = []
        self.cache_bytes: int | None = None
        self.counted: float | None = None


class NotRun:
    """A configuration that was not run (a peer without a checkout), with the reason; never timed or faked."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason


def one_run(config: Config, steps: int) -> None:
    """Time one sampling run: the first step (with the run's setup), the steady steps, the term, the memory.

    Times are the process's CPU time (all its threads): on a machine shared with other jobs it grows far less
    than wall time when the cores are contended; wall time is kept beside it."""
    marks: list[tuple[float, float]] = []
    inside: list[float] = []

    def tick() -> None:
        marks.append((time.process_time(), time.perf_counter()))
        if config.inside is not None:
            inside.append(config.inside.seconds)

    if config.inside is not None:
        config.inside.reset()
    with PeakRSS() as mem:
        start = (time.process_time(), time.perf_counter())
        config.run(steps, tick)
    if len(marks) != steps:
        raise RuntimeError(f"{config.name}: expected {steps} step callbacks, got {len(marks)}")
    cpu = [b[0] - a[0] for a, b in zip([start] + marks[:-1], marks)]
    wall = [b[1] - a[1] for a, b in zip([start] + marks[:-1], marks)]
    config.first.append(cpu[0])
    config.steady.append(_median(cpu[1:]))
    config.wall.append(_median(wall[1:]))
    if config.inside is not None:
        config.inside_s.append((inside[-1] - inside[0]) / max(1, steps - 1))
    config.memory.append(mem.growth)
    if config.cache is not None:
        config.cache_bytes = config.cache()


def count_added(configs: list, base_flops: float) -> None:
    """Each configuration's torch-counted FLOPs of a steady step (the second of a run) minus the base step's
    (``Config.counted``): the check of the formula's estimate."""
    for c in configs[1:]:
        if isinstance(c, Config):
            c.counted = run_flops(c.run, 2)[1] - base_flops


def interleave(configs: list[Config], rounds: int, steps: int, log=print) -> None:
    """``rounds`` rounds, each one run of every configuration in turn (base first), so that a slower or faster
    period of the shared machine hits every configuration alike."""
    for r in range(rounds):
        for c in configs:
            one_run(c, steps)
            extra = f", inside the term {c.inside_s[-1] * 1000:.0f} ms / step" if c.inside is not None else ""
            log(f"[bench] round {r + 1}/{rounds} {c.name}: first {c.first[-1]:.2f} CPU s, steady "
                f"{c.steady[-1]:.2f} CPU s ({c.wall[-1]:.2f} s wall){extra}, peak +{c.memory[-1] / 2**20:.0f} MiB")


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def family_table(title: str, setting: str, configs: list, base_flops: float, rounds: int, steps: int) -> str:
    """The family's markdown table: one row per configuration (the first is the base), then the notes.

    All times are process CPU seconds (see ``one_run``). Added time = median over rounds of (configuration's steady
    step - base's steady step in the same round); the time inside the added term is measured within the
    configuration's own steps. FLOP-estimated time = added FLOP estimate / the base's measured rate (base FLOP
    counted by torch / base steady CPU time), so "measured / FLOP estimate" is 1.0 when the added work runs as
    fast per FLOP as the base model does."""
    base = configs[0]
    rate = base_flops / _median(base.steady)  # FLOP per CPU second this machine gave the base step
    lines = [f"### {title}", "", setting, "",
             (f"Base: {base_flops / 1e9:.1f} GFLOP / step counted by torch, {rate / 1e9:.1f} GFLOP per CPU second "
              f"measured. {rounds} interleaved rounds of {steps}-step runs; medians over rounds."), "",
             ("| configuration | steady CPU s / step (wall s) | × base | first step CPU s (setup) | added CPU s / step "
              "| inside the added term, CPU ms / step | peak memory growth MiB (vs base) | per-run cache MiB "
              "| added GFLOP / step: estimate (counted) | measured / FLOP estimate |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base_steady, base_setup = _median(base.steady), _median(base.first) - _median(base.steady)
    base_mem = max(base.memory)
    for c in configs:
        if isinstance(c, NotRun):
            lines.append(f"| {c.name} | not run: {c.reason} | | | | | | | | |")
            continue
        steady = _median(c.steady)
        added = _median([s - b for s, b in zip(c.steady, base.steady)])
        setup = _median(c.first) - steady
        mem = max(c.memory)
        inside = _median(c.inside_s) if c.inside_s else None
        if c is base:
            lines.append(f"| {c.name} | {steady:.2f} ({_median(c.wall):.2f}) | 1.00 | {_median(c.first):.2f} "
                         f"({setup:+.2f}) | - | - | {mem / 2**20:.0f} | - | - | - |")
            continue
        est_s = c.flops / rate
        measured = inside if inside is not None else added
        ratio = f"{measured / est_s:.2f}" if est_s > 0 else "-"
        counted = f" ({c.counted / 1e9:.2f})" if c.counted is not None else ""
        cache = f"{c.cache_bytes / 2**20:.0f}" if c.cache_bytes is not None else "none (per call)"
        lines.append(
            f"| {c.name} | {steady:.2f} ({_median(c.wall):.2f}) | {steady / base_steady:.3f} | {_median(c.first):.2f} "
            f"({setup - base_setup:+.2f} vs base) | {added:+.3f} | "
            f"{'-' if inside is None else f'{inside * 1000:.0f}'} | {mem / 2**20:.0f} ({(mem - base_mem) / 2**20:+.0f}) | "
            f"{cache} | {c.flops / 1e9:.2f}{counted} | {ratio} |")
    lines += ["", ("Columns: times are the process's CPU time (all its threads; the machine's cores are shared "
                   "with other jobs, which inflates wall time far more), wall time in brackets. *first step "
                   "(setup)* is the first step of a run, which builds the per-run caches (in brackets: its excess "
                   "over a steady step beyond the base's own first-step excess); *added CPU s / step* is the steady "
                   "step minus the base's in the same round (median over rounds); *inside the added term* is timed "
                   "within the configuration's own steps; *measured / FLOP estimate* divides that time (or the added "
                   "time where the term is not one call) by the time the base's measured GFLOP per CPU second gives "
                   "the estimated added work (1.0: as fast per FLOP as the base model); *counted*: torch's "
                   "FlopCounterMode on a steady step minus the base step, where run.")]
    formulas = [f"- {c.name}: {c.formula}" for c in configs if not isinstance(c, NotRun) and c.formula]
    if formulas:
        lines += ["", "FLOP estimates (scripts/bench_common.py):", *formulas]
    return "\n".join(lines) + "\n"


def sampler_run(model, positive: list, negative: list, latent, steps: int, tick, cfg: float = 1.0) -> None:
    """One sampling run as KSampler makes it (seeded noise, euler, simple schedule, ``cfg`` 1: the cond pass
    only), calling ``tick()`` after every step through the sampler's own callback."""
    import comfy.sample
    import torch

    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, 0)
        comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                            disable_pbar=True, callback=lambda *args: tick())


def run_flops(run, steps: int = 2) -> list[float]:
    """FLOPs counted by ``flop_counter()`` in each step of one run of ``run(steps, tick)`` (a ``Config.run``)."""
    counter = flop_counter()
    marks: list[float] = []
    with counter:
        run(steps, lambda: marks.append(counter.get_total_flops()))
    return [float(b - a) for a, b in zip([0] + marks[:-1], marks)]


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensors in a nested dict / list / tuple (each storage counted once)."""
    import torch

    seen: set = set()
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            key = (o.untyped_storage().data_ptr(), o.device)
            if key not in seen:
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def profile_added(base_run, run, steps: int = 2, rows: int = 10) -> str:
    """torch.profiler (CPU) on one base step and on the last step of a ``steps``-step run of ``run`` (a steady step
    when ``steps`` > 1): the top operators of each by self CPU time, and the added self CPU time per operator."""
    from torch.profiler import ProfilerActivity, profile

    def last_step(fn, n: int):
        prof = profile(activities=[ProfilerActivity.CPU])
        ticks = []

        def tick() -> None:
            ticks.append(1)
            if len(ticks) == n - 1:
                prof.start()
            elif len(ticks) == n:
                prof.stop()

        if n == 1:
            prof.start()
        fn(n, tick)
        return prof.key_averages()

    base_run(1, lambda: None)  # warm-up
    totals, out = {}, []
    for name, fn, n in (("base", base_run, 1), ("patched", run, steps)):
        events = last_step(fn, n)
        totals[name] = {e.key: e.self_cpu_time_total / 1e6 for e in events}
        out.append(f"{name}: top operators by self CPU time (one step)\n\n```\n"
                   f"{events.table(sort_by='self_cpu_time_total', row_limit=rows)}\n```\n")
    ops = sorted(set(totals["base"]) | set(totals["patched"]),
                 key=lambda k: totals["patched"].get(k, 0) - totals["base"].get(k, 0), reverse=True)
    lines = ["Added self CPU time per operator (patched step minus base step):", "",
             "| operator | base CPU s | patched CPU s | added |", "| --- | --- | --- | --- |"]
    for k in ops[:rows]:
        b, c = totals["base"].get(k, 0.0), totals["patched"].get(k, 0.0)
        lines.append(f"| {k} | {b:.3f} | {c:.3f} | {c - b:+.3f} |")
    return "\n".join(out) + "\n" + "\n".join(lines) + "\n"
