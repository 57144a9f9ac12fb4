"""TroupeRoutingPreview: the routing gates w_0..w_3 over the steps of a sampler and scheduler (Eqs. 5-6 of 000)."""
from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..models.sdxl.router import MODES, SCHEDULE_HELP, TimestepRouter, route, router_time
from ..models.sdxl.routing_chart import draw_routing, weights_table
from . import types
from .errors import error_text, node_error

NODE = "TroupeRoutingPreview"
CATEGORY = "Troupe/adapters"
DEFAULT_SCHEDULE = "1.0: 1,0,0,0; 0.5: 0.25,0.25,0.25,0.25; 0.0: 0,0,0,1"


# --------------------------------------------------------------------------- work function


def step_sigmas(model, sampler_name: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigma at the start of every step, exactly as KSampler computes them (denoise, discarded sigmas)."""
    sigmas = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                     denoise=denoise).sigmas
    return sigmas[:-1].float().cpu()


def routing_over_steps(model, sampler_name: str, scheduler: str, steps: int, denoise: float, mode: str,
                       schedule: str, refine: bool, adapter=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights [S, L] and the router's t [S] at every step: the adapter's router, or the paper's initial one."""
    module = None
    if adapter is not None:
        if adapter.family != "sdxl":
            raise node_error(NODE, "adapter", f"got a {adapter.family.upper()} adapter ({adapter.format}); "
                             "connect an SDXL adapter from TroupeLoadAdapter, or leave it empty")
        module = adapter.module
    levels = module.levels(refine) if module is not None else (4 if refine else 1)
    router = module.router if module is not None else TimestepRouter(4)
    sigmas = step_sigmas(model, sampler_name, scheduler, steps, denoise)
    if not len(sigmas):
        raise node_error(NODE, "denoise", "is 0, so there are no steps to plot; raise it above 0")
    times = router_time(model.get_model_object("model_sampling"), sigmas).flatten()
    try:
        weights = torch.stack([route(float(t), levels, mode, router, schedule) for t in times])
    except ValueError as e:
        where = "schedule" if mode == "manual" else "mode"
        raise node_error(NODE, None, f"input '{where}': {e}") from None
    return weights, times


# --------------------------------------------------------------------------- node


class TroupeRoutingPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Troupe Routing Preview (SDXL levels)",
            category=CATEGORY,
            description="Plot the gate weights w0..w3 of the four token levels (T_base coarse ... T3 fine detail) at "
                        "every step of a sampler and scheduler, so you see when each granularity acts (R^3-Adapter "
                        "Eqs. 5-6). Use the same settings as your KSampler and TroupeApplySDXL.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model you sample with (its noise schedule sets each "
                                                "step's timestep)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampler of your KSampler (some drop a sigma, which shifts the steps)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The scheduler of your KSampler."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="The steps of your KSampler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The denoise of your KSampler (below 1 starts later in the schedule)."),
                io.Combo.Input("mode", options=list(MODES), default="learned",
                               tooltip="learned: the adapter's RBF router (Eq. 5); static: equal weights (25% each "
                                       "with 4 levels); manual: the schedule below."),
                io.String.Input("schedule", default=DEFAULT_SCHEDULE, multiline=False,
                                tooltip=f"Manual mode only: {SCHEDULE_HELP}."),
                io.Boolean.Input("refine", default=True,
                                 tooltip="Off: the base level only (alpha = 0, MS-Diffusion), one weight of 1."),
                types.Adapter.Input("adapter", optional=True,
                                    tooltip="An SDXL adapter from TroupeLoadAdapter; empty: the paper's initial "
                                            "router (base tokens early, detail tokens late)."),
            ],
            outputs=[io.Image.Output(display_name="chart",
                                     tooltip="The gates of the four token levels at every step of the sampler."), io.String.Output(display_name="weights",
                                                                                                                                   tooltip="The same gates as text, one line per step.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, sampler_name: str, scheduler: str, mode: str) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself (KSampler would silently fall back)."""
        for name, value, options in (("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
                                     ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS),
                                     ("mode", mode, MODES)):
            if value not in options:
                choices = ", ".join(options) if len(options) <= 8 else f"the {len(options)} listed in the node"
                return error_text(NODE, name, f"unknown value {value!r}; pick one of {choices}")
        return True

    @classmethod
    def execute(cls, model, sampler_name: str, scheduler: str, steps: int, denoise: float, mode: str, schedule: str,
                refine: bool, adapter=None) -> io.NodeOutput:
        weights, times = routing_over_steps(model, sampler_name, scheduler, steps, denoise, mode, schedule,
                                            refine, adapter)
        title = f"routing: {mode}  |  {sampler_name} / {scheduler}, {steps} steps" + \
                (f", denoise {denoise:g}" if denoise < 1 else "")
        chart = draw_routing(weights, times, title)
        return io.NodeOutput(chart, weights_table(weights, times), ui=ui.PreviewImage(chart, cls=cls))
