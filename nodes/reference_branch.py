"""FLUX reference branch nodes: TroupeReferenceBranch (MOSAIC / AlignGen) and TroupeAttentionMaskPreview."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import comfy.ldm.flux.math
import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models.adapter_file import AdapterFormatError, read_state_dict
from ..models.layout.grid import token_grid
from ..models.reference.branch import (
    POSITION_MODES,
    REFERENCE_ATTENTION,
    LabelNotFound,
    ReferenceBranch,
    ReferenceOptions,
    label_positions,
    prepare_reference_image,
    token_ids,
    trained_positions,
)
from ..models.reference.dem import (
    Alignment,
    EmbeddingsAsIds,
    StarNotFound,
    TokenAlignment,
    load_dem,
    star_positions,
)
from ..models.reference.hooks import ReferencePatch
from ..models.reference.lora import FluxDims, load_reference_lora
from ..models.reference.mask_preview import draw_attention_mask
from . import lifecycle, paths, types
from .errors import error_text, node_error, number_error
from .search import aliases

CATEGORY = "Troupe/apply"
PREVIEW_CATEGORY = "Troupe/flux"
NODE = "TroupeReferenceBranch"
NONE = "none"


# --------------------------------------------------------------------------- work functions


@dataclass(frozen=True)
class BranchInputs:
    """Everything TroupeReferenceBranch takes besides the model, VAE, subjects and layout."""

    prompt: str
    reference_size: int = 512
    options: ReferenceOptions = dataclasses.field(default_factory=ReferenceOptions)
    lora_name: str = NONE
    dem_name: str = NONE



def flux_dit(model):
    """The ComfyUI FLUX diffusion model inside a MODEL, or a clear error."""
    dit = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dit is None or not hasattr(dit, "double_blocks") or not hasattr(dit, "single_blocks"):
        raise node_error(NODE, "model", "expected a FLUX model (double and single stream blocks); load FLUX.1 dev/schnell")
    return dit


def t5_tokenizer(clip=None):
    """ComfyUI's own FLUX T5-XXL tokenizer (from the CLIP when given, else a fresh one from its files)."""
    if clip is not None:
        tok = getattr(getattr(clip, "tokenizer", None), "t5xxl", None)
        if tok is None:
            raise node_error(NODE, "clip", "this CLIP has no T5-XXL tokenizer; connect the FLUX DualCLIPLoader output or leave "
                               "it empty (the node then uses ComfyUI's T5 tokenizer files)")
        return tok
    from comfy.text_encoders.flux import T5XXLTokenizer

    return T5XXLTokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"))


EMBEDDING_WORD = re.compile(r"(?:^|(?<=\s))embedding:([^\s,<\[]+)")
S_STAR_EXAMPLE = "aligngen_s_star"


def embedding_path(tokenizer, name: str) -> str | None:
    """The file ``embedding:<name>`` loads, found as ComfyUI's ``load_embed`` finds it (the name, then with
    .safetensors / .pt / .bin, in each embeddings folder)."""
    dirs = getattr(tokenizer, "embedding_directory", None) or []
    for folder in [dirs] if isinstance(dirs, str) else dirs:
        base = os.path.abspath(os.path.join(folder, name))
        for candidate in (base, base + ".safetensors", base + ".pt", base + ".bin"):
            if os.path.isfile(candidate):
                return candidate
    return None


def check_s_star_embeddings(tokenizer, prompt: str, dim: int, example: str) -> None:
    """Every ``embedding:<name>`` in the prompt must be a T5 input embedding the DEM can read: a file in
    models/embeddings holding ``t5xxl`` of shape [1, dim] (or [n, dim] for other textual inversions)."""
    if getattr(tokenizer, "embedding_directory", None) is None:
        raise node_error(NODE, "clip", "this CLIP's tokenizer has no embeddings folder, so 'embedding:' words in the "
                                       "prompt are read as plain text; load the text encoders with DualCLIPLoader "
                                       "(type flux) or leave 'clip' empty")
    fix = (f"put the S* file the AlignGen trainer wrote (e.g. {example}.safetensors, key 't5xxl', shape [1, {dim}]) "
           f"in models/embeddings and write 'embedding:{example}' right before each subject's label")
    for name in dict.fromkeys(EMBEDDING_WORD.findall(prompt)):
        path = embedding_path(tokenizer, name)
        if path is None:
            raise node_error(NODE, "prompt", f"embedding '{name}' is not in models/embeddings; {fix}")
        try:
            sd = read_state_dict(path)
        except AdapterFormatError as e:
            raise node_error(NODE, "prompt", f"embedding '{name}' ({os.path.basename(path)}) cannot be read: {e}; "
                                             f"{fix}") from None
        vec = sd.get("t5xxl")
        if not isinstance(vec, torch.Tensor):
            raise node_error(NODE, "prompt", f"embedding '{name}' has no 't5xxl' tensor (keys: {sorted(sd)[:4]}): it "
                                             f"is not a T5 (FLUX) textual inversion; {fix}")
        if vec.dim() != 2 or vec.shape[-1] != dim:
            raise node_error(NODE, "prompt", f"embedding '{name}' has 't5xxl' of shape {list(vec.shape)}, the DEM "
                                             f"and T5 need [1, {dim}]; {fix}")


def find_labels(tokenizer, prompt: str, labels: list[str]) -> tuple[list[list[int]], int]:
    try:
        return label_positions(tokenizer, prompt, labels)
    except LabelNotFound as e:
        raise node_error(NODE, "prompt", f"{e}; write the label in the prompt (e.g. 'a photo of a corgi') or change the "
                             "subject's label") from None


def encode_references(vae, model, subjects, size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Each view of each subject, masked and centred on white, VAE-encoded into the model's latent space."""
    latents, owner = [], []
    progress = comfy.utils.ProgressBar(sum(s.num_images for s in subjects))  # one step per subject and view
    for j, s in enumerate(subjects):
        masks = s.masks() if s.mask is not None else [None] * s.num_images
        for v in range(s.num_images):
            pixels = prepare_reference_image(s.image[v], masks[v], size)[None]
            with torch.inference_mode():
                lat = vae.encode(pixels[..., :3])
                lat = model.model.process_latent_in(lat.float())
            latents.append(lat[0].detach().float().cpu().clone())
            owner.append(j)
            progress.update(1)
    return latents, owner


def read_lora(name: str, dit):
    path = paths.full_path(NODE, "lora_name", paths.LORA_FOLDERS, name)
    try:
        return load_reference_lora(read_state_dict(path), FluxDims.from_model(dit))
    except AdapterFormatError as e:
        raise node_error(NODE, "lora_name", f"{name}: {e}") from None


def read_dem(name: str, label_pos: list[list[int]], n_t5: int, tokenizer=None, prompt: str = "",
             labels: list[str] | None = None) -> Alignment | TokenAlignment:
    """The DEM file as the alignment the branch runs: ``TokenAlignment`` (S* a T5 input embedding written in the
    prompt) or, for a legacy file with ``s_star`` in T5's output space, ``Alignment`` exactly as before."""
    path = folder_paths.get_full_path_or_raise("troupe", name)
    try:
        sd = read_state_dict(path)  # a truncated or unsafe file is refused here, named, before the header is read
        metadata = {}
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        dem = load_dem(sd, metadata)
    except AdapterFormatError as e:
        raise node_error(NODE, "dem_name", f"{name}: {e}") from None
    if dem.legacy:
        return Alignment(dem, label_pos, n_t5)
    tokenizer = tokenizer if tokenizer is not None else t5_tokenizer()
    example = metadata.get("embedding") or S_STAR_EXAMPLE
    check_s_star_embeddings(tokenizer, prompt, dem.dim, example)
    ids = token_ids(EmbeddingsAsIds(tokenizer), prompt)
    try:
        stars = star_positions([i == -1 for i in ids], label_pos, labels)
    except StarNotFound as e:
        raise node_error(NODE, "prompt", f"{e}: with the DEM file '{name}', write the S* embedding right before each "
                                         f"subject's label, e.g. 'a photo of embedding:{example} corgi' (the same "
                                         "prompt in the text encoder), or pick a legacy DEM file or none") from None
    concept = [[star] + list(pos) for star, pos in zip(stars, label_pos)]
    return TokenAlignment(dem, stars, concept, n_t5, embedding=example)


def reference_patches(model) -> list[ReferencePatch]:
    """The reference branches already on a model, outermost first."""
    return [p for p in lifecycle.installed(model).values() if isinstance(p, ReferencePatch)]


def install_branch(model, branch: ReferenceBranch, attention=comfy.ldm.flux.math.attention):
    """A clone of ``model`` with the branch on every double and single block and the model function."""
    dit = branch.dit
    blocks = [("double_block", i) for i in range(len(dit.double_blocks))]
    blocks += [("single_block", i) for i in range(len(dit.single_blocks))]
    return lifecycle.install(model, ReferencePatch(branch, attention), "reference", dit=blocks, model_function=True)


def reference_branch(model, vae, subjects, inputs: BranchInputs, layout=None, clip=None):
    """Patched clone of a FLUX model with the subjects' reference stream; returns (model, report)."""
    dit = flux_dit(model)
    if not subjects:
        raise node_error(NODE, "subjects", "connect at least one subject (TroupeSubject -> TroupeSubjectList)")
    opts = inputs.options
    if opts.region and (layout is None or len(layout) < len(subjects)):
        raise node_error(NODE, "layout", f"'region' needs a layout with one region per subject ({len(subjects)}); connect a "
                             "TroupeLayout or switch 'region' off")
    if getattr(vae, "latent_channels", dit.params.in_channels) != dit.params.in_channels:
        raise node_error(NODE, "vae", f"the VAE makes {vae.latent_channels}-channel latents, the model takes "
                          f"{dit.params.in_channels}; use the FLUX VAE (ae.safetensors)")
    earlier = reference_patches(model)
    if earlier and (inputs.dem_name != NONE or any(p.branch.dem is not None for p in earlier)):
        raise node_error(NODE, "dem_name", "a reference branch with S* + DEM rewrites the prompt tokens, so it cannot be "
                                           "chained with another reference branch; put every subject in one "
                                           "TroupeReferenceBranch, or set dem_name to none on both")
    tokenizer = t5_tokenizer(clip)
    labels = [s.label for s in subjects]
    positions, n_t5 = find_labels(EmbeddingsAsIds(tokenizer), inputs.prompt, labels)
    lora = read_lora(inputs.lora_name, dit) if inputs.lora_name != NONE else None
    dem = None
    if inputs.dem_name != NONE:
        dem = read_dem(inputs.dem_name, positions, n_t5, tokenizer, inputs.prompt, labels)
    latents, owner = encode_references(vae, model, subjects, inputs.reference_size)
    region_masks = None
    if layout is not None:
        region_masks = lambda h, w: layout.masks(h, w)[: len(subjects)]
    opts = dataclasses.replace(opts, positions=trained_positions(opts.positions, lora.format if lora else None))
    base = model.model
    branch = ReferenceBranch(dit=dit, latents=latents, ref_subject=owner, options=opts,
                             concept_positions=positions, subject_weights=[s.weight for s in subjects],
                             region_masks=region_masks, lora=lora, dem=dem,
                             compute_dtype=getattr(base, "manual_cast_dtype", None) or base.get_dtype(),
                             n_txt_hint=dem.n_aligned if dem is not None else n_t5)
    patched = install_branch(model, branch)
    lines = [f"{len(latents)} reference(s) of {len(subjects)} subject(s) at {inputs.reference_size}px, "
             f"t_ref={opts.timestep}, attention={opts.attention}, positions: {opts.positions}"
             + (" (as trained)" if inputs.options.positions == "as trained" else "")]
    if earlier:
        lines.append(f"joins {len(earlier)} reference branch(es) already on the model (one joint attention)")
    for s, p in zip(subjects, positions):
        lines.append(f"  {s.label!r}: T5 tokens {p}")
    lines.append(f"LoRA: {lora.summary() if lora else 'none (base weights on the reference tokens)'}")
    if isinstance(dem, TokenAlignment):
        lines.append(f"DEM: {inputs.dem_name} (S* = the T5 input embedding before each label, at T5 tokens "
                     f"{dem.stars}, updated by the Deviation Extraction Module; needs Redux tokens)")
    elif dem is not None:
        lines.append(f"DEM: {inputs.dem_name} (legacy S* in T5 output space: a vector inserted after the text encoder "
                     "before each label, T5 never sees it; needs Redux tokens)")
    else:
        lines.append("DEM: none: running the reference branch and masks alone (no S*)")
    return patched, "\n".join(lines)


def mask_preview(model, width: int, height: int, size: int = 768) -> torch.Tensor:
    """IMAGE [1, size, size, 3] of the joint attention mask of the model's (outermost) reference branch."""
    patches = reference_patches(model)
    if not patches:
        raise ValueError("TroupeAttentionMaskPreview: input 'model': no reference branch in this model; connect the "
                         "MODEL output of TroupeReferenceBranch")
    branch = patches[0].branch
    grid = token_grid(height // 8, width // 8, branch.patch)
    positions = branch.concept_positions
    if branch.dem is not None:
        positions = branch.dem.aligned_positions()
    spec = branch.mask_spec(branch.n_txt_hint, grid[0] * grid[1], grid, positions)
    return draw_attention_mask(spec, size)


# --------------------------------------------------------------------------- nodes


def _files() -> list[str]:
    return [NONE] + paths.list_files("troupe")


def _lora_files() -> list[str]:
    return [NONE] + paths.choices(paths.LORA_FOLDERS)


def check_settings(dem_name: str, reference_attention: str, reference_timestep: float,
                   reference_guidance: float, lora_strength: float) -> None:
    """What ``validate_inputs`` leaves to run time, before any work: NaN (it passes ComfyUI's range check),
    a hand-edited attention mode, a DEM file that is not there."""
    for name, value, high in (("reference_timestep", reference_timestep, 1.0),
                              ("reference_guidance", reference_guidance, 100.0),
                              ("lora_strength", lora_strength, 2.0)):
        if (problem := number_error(NODE, name, value, 0.0, high)) is not None:
            raise ValueError(problem)
    if reference_attention not in REFERENCE_ATTENTION:
        raise node_error(NODE, "reference_attention", f"expected one of {REFERENCE_ATTENTION}, got "
                                                      f"{reference_attention!r}")
    if dem_name not in _files():
        raise node_error(NODE, "dem_name", f"no file '{dem_name}' in models/troupe; put it there and refresh (R), "
                                           "or pick 'none'")


class TroupeReferenceBranch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            **aliases("mosaic", "aligngen", "redux", "reference lora", "multi subject flux"),
            display_name="Troupe Reference Branch (FLUX)",
            category=CATEGORY,
            description="MOSAIC / AlignGen reference branch for FLUX: each subject's reference (masked to the "
                        "subject, VAE-encoded) joins every block as extra tokens with its own timestep, an optional "
                        "reference-only LoRA (MOSAIC's subject_512.safetensors or Troupe's layout), non-overlapping "
                        "RoPE positions and a joint attention mask (no reference-to-reference attention; optional "
                        "selective text mask, Eq. 6 of AlignGen, and layout regions). Returns a patched copy; "
                        "chained after another reference branch, both sets of references join one attention.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 model (dev or schnell). It is cloned, never changed."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors) that encodes the reference images."),
                types.Subjects.Input("subjects", tooltip="The subjects (TroupeSubjectList); every view of a subject "
                                                         "becomes one reference, masked to the subject."),
                io.String.Input("prompt", multiline=True, default="a photo of a corgi and a teapot",
                                tooltip="The positive prompt, exactly as given to the text encoder: each subject's "
                                        "label is located in its T5 tokens (selective mask, S*). With a DEM file, "
                                        "write the S* embedding before each label: 'a photo of "
                                        "embedding:aligngen_s_star corgi'."),
                io.Int.Input("reference_size", default=512, min=64, max=2048, step=16,
                             tooltip="Side of the square each reference is resized to (MOSAIC was trained at 512)."),
                io.Float.Input("reference_timestep", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Timestep of the reference tokens' modulation (0 = clean, as MOSAIC)."),
                io.Float.Input("reference_guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance value embedded for the reference tokens (MOSAIC uses 1)."),
                io.Combo.Input("reference_attention", options=list(REFERENCE_ATTENTION), default="joint",
                               tooltip="joint: a reference attends to itself, the text and the image (MOSAIC, "
                                       "recomputed each step). self_cached: to itself only; its K/V are computed "
                                       "once per run and reused (faster)."),
                io.Boolean.Input("selective_text", default=False,
                                 tooltip="AlignGen Eq. 6: only the tokens of a subject's label (and S*) may attend "
                                         "to that subject's reference."),
                io.Boolean.Input("region", default=False,
                                 tooltip="Image tokens attend only to the reference of the subject whose layout "
                                         "region they are in (needs a layout)."),
                io.Combo.Input("lora_name", options=_lora_files(), default=NONE,
                               tooltip="Reference LoRA in models/loras or models/troupe (MOSAIC's "
                                       "subject_512.safetensors or Troupe's layout); none = base weights on the "
                                       "reference tokens."),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scale of the reference LoRA (1 = as trained)."),
                io.Combo.Input("dem_name", options=_files(), default=NONE,
                               tooltip="Deviation Extraction Module weights (AlignGen) in models/troupe; S* is "
                                       "the T5 embedding (models/embeddings) written as 'embedding:<name>' before "
                                       "each label in the prompt. Needs each subject's Redux tokens in the "
                                       "conditioning. Legacy DEM files (with S* inside) still run: their S* is "
                                       "inserted after the text encoder (the report says so). none = branch and "
                                       "masks alone."),
                types.Layout.Input("layout", optional=True,
                                   tooltip="Subject regions (region i = subject i), for the 'region' option."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional FLUX CLIP: its T5 tokenizer finds the label tokens. Without it "
                                      "ComfyUI's own T5 tokenizer files are used (no weights needed)."),
                io.Combo.Input("reference_positions", options=list(POSITION_MODES), default="as trained",
                               optional=True,
                               tooltip="RoPE positions of the references. 'as trained': by the LoRA file (MOSAIC's: "
                                       "each reference its own offset; Troupe's AlignGen-style: the same index). "
                                       "'offset per reference (MOSAIC)', 'same index (AlignGen)' (Sec. 4.2 of "
                                       "AlignGen: every reference at the same positions, left of the image)."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A patched copy of the FLUX model with the reference branch: connect it to the sampler.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, lora_name: str = NONE) -> bool | str:
        """At queue time, the LoRA file only: ComfyUI 0.3.75 repeats a failed ``validate_inputs`` once per input it
        declares, so one declared input reports a missing file once (docs/queue-errors.md); the other checks run
        first thing in ``execute`` (``check_settings``)."""
        if lora_name not in _lora_files():
            return error_text(NODE, "lora_name", f"no file '{lora_name}' in models/troupe or models/loras; put it there "
                                                 "and refresh (R), or pick 'none'")
        return True

    @classmethod
    def execute(cls, model, vae, subjects, prompt: str, reference_size: int, reference_timestep: float,
                reference_guidance: float, reference_attention: str, selective_text: bool, region: bool,
                lora_name: str, lora_strength: float, dem_name: str, layout=None, clip=None,
                reference_positions: str = "as trained") -> io.NodeOutput:
        check_settings(dem_name, reference_attention, reference_timestep, reference_guidance, lora_strength)
        options = ReferenceOptions(timestep=reference_timestep, guidance=reference_guidance,
                                   attention=reference_attention, selective_text=selective_text, region=region,
                                   lora_strength=lora_strength, positions=reference_positions)
        inputs = BranchInputs(prompt=prompt, reference_size=reference_size, options=options, lora_name=lora_name,
                              dem_name=dem_name)
        patched, report = reference_branch(model, vae, subjects, inputs, layout=layout, clip=clip)
        return io.NodeOutput(patched, ui=ui.PreviewText(report))


class TroupeAttentionMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeAttentionMaskPreview",
            display_name="Troupe Attention Mask Preview",
            category=PREVIEW_CATEGORY,
            description="Draws the joint attention mask of a reference-branch model: rows are queries, columns keys, "
                        "in the order text | image | reference 1 | reference 2 ...; grey = text, white = image, "
                        "subject colours = references, black = blocked; yellow lines separate the parts.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of TroupeReferenceBranch."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=16,
                             tooltip="Width in pixels of the image you will generate (sets the image token count)."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=16,
                             tooltip="Height in pixels of the image you will generate."),
            ],
            outputs=[io.Image.Output(display_name="image",
                                     tooltip="The joint attention mask: who may attend to whom.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, width: int, height: int) -> io.NodeOutput:
        img = mask_preview(model, width, height).to(comfy.model_management.intermediate_device())
        return io.NodeOutput(img, ui=ui.PreviewImage(img, cls=cls))
