"""AlignGen training: S* (a T5 input embedding), the Deviation Extraction Module and the rank-16 reference LoRA.

AlignGen: Personalized Image Generation via Cross-Modality Prior Alignment, Secs. 3.1-3.3, "Training Strategy" and
"Implementation details":

- **What trains**: the learnable token S* (one T5 *input* word embedding, Sec. 3.2, as Textual Inversion), the DEM
  (Eqs. 3-5) and a rank-16 LoRA on the reference tokens only (Fig. 4); the FLUX base, T5, CLIP-L and the VAE
  stay frozen.
- **Random reference dropout** ("Training Strategy", Table 3: rate 0.5): the reference image is replaced by a black
  image, so the target must come from S*' and the text alone; the black image feeds both the VAE reference tokens
  and the Redux tokens the DEM reads (the whole visual prior is gone).
- **Random concept-name substitution** ("Training Strategy"): the subject's label in the caption is replaced by its
  manifest ``parent_class`` or ``category`` (one of them, equally likely) with ``method.concept_substitution``.
- **Optimiser**: Prodigy with safeguard warmup and bias correction, weight decay 0.01 ("Implementation details"),
  as ``train.optimizer = "prodigy"`` when the optional prodigyopt package is installed; AdamW otherwise.

The files a run writes are what ``TroupeReferenceBranch`` loads: ``<s_star_name>.safetensors`` (models/embeddings,
key ``t5xxl`` [1, D]), ``<name>.dem.safetensors`` (models/troupe, ``format=troupe.dem`` without ``s_star``) and the
reference LoRA (models/troupe or models/loras, the ``troupe`` layout).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.reference.branch import SAME_INDEX, ReferenceOptions, prepare_reference_image
from ..models.reference.dem import DeviationExtractionModule, align_tokens
from .flux import OutOfPlace
from .reference import REFERENCE_FILL, LossSettings, ReferenceMethod, ReferenceSample, ReferenceTrainModule

METHOD = "aligngen"
S_STAR_FORMAT = "troupe.s_star"


# --------------------------------------------------------------------------- the two training strategies


def draw_reference_dropout(gen: torch.Generator, rate: float) -> bool:
    """Random reference dropout ("Training Strategy" of AlignGen): True with probability ``rate`` (one uniform draw,
    always taken, so the stream's later draws do not depend on the outcome)."""
    return float(torch.rand((), generator=gen)) < rate


def black_reference(image: torch.Tensor) -> torch.Tensor:
    """The dropped reference: a black image of the same shape (AlignGen's c_ref', "which lacks visual priors")."""
    return torch.zeros_like(image)


def whole_word(label: str) -> re.Pattern:
    """The label as a whole word or phrase, case-insensitive (the manifest's ``label_in_caption`` rule)."""
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in label.split()) + r"(?!\w)", re.IGNORECASE)


def substitute_concept(caption: str, label: str, names: Sequence[str], probability: float,
                       gen: torch.Generator) -> tuple[str, str]:
    """Random concept-name substitution ("Training Strategy" of AlignGen): with ``probability`` every occurrence of
    ``label`` in the caption becomes one of ``names`` (the subject's parent class and broader category, equally
    likely); returns (caption, the word now naming the subject). Two draws are always taken (whether to substitute,
    which name), so the stream does not depend on the outcome; no names = never substituted."""
    u = float(torch.rand((), generator=gen))
    k = int(torch.randint(0, max(1, len(names)), (1,), generator=gen))
    if not names or u >= probability:
        return caption, label
    name = names[k]
    return whole_word(label).sub(lambda _m: name, caption), name


def concept_names(subject) -> tuple[str, ...]:
    """A manifest subject's substitutes: its ``parent_class`` and ``category``, those given."""
    return tuple(n for n in (getattr(subject, "parent_class", ""), getattr(subject, "category", "")) if n)


# --------------------------------------------------------------------------- what trains


class SStar(nn.Module):
    """S*: one trainable vector in T5's input embedding space, [1, D] (the ``t5xxl`` embedding file's shape)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vector = nn.Parameter(init.detach().float().reshape(1, -1).clone())

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """What ComfyUI's ``load_embed`` reads for the FLUX tokenizer (``embedding_key`` 't5xxl')."""
        return {"t5xxl": self.vector.detach().float().cpu().contiguous()}


def s_star_start(t5_tokenizer, table: torch.Tensor, word: str) -> torch.Tensor:
    """S*'s starting vector: T5's input embedding of ``word``'s first token (Textual Inversion starts from a coarse
    descriptor of the concept); ``t5_tokenizer`` is ComfyUI's T5 tokenizer, ``table`` T5's embedding weights."""
    ids = [i for i in t5_tokenizer.tokenizer(word)["input_ids"] if i not in (0, 1)]  # no pad / end token
    if not ids:
        from .config import ConfigError

        raise ConfigError(f'method.s_star_init: "{word}" gives no T5 token; use an ordinary word such as "object"')
    return table[ids[0]].detach().float().clone()


def new_dem(dim: int, redux_dim: int, heads: int, mlp_ratio: float, seed: int) -> DeviationExtractionModule:
    """A fresh DEM (S* kept outside it, in its embedding file): torch's default initialisation under ``seed``, then
    every residual branch's output layer (``to_out`` of Eqs. 3 and 4, ``fc2`` of Eq. 5) at zero, so S*' = S* at the
    start and training moves away from the plain textual-inversion token (our choice: AlignGen gives none)."""
    if dim % heads:
        from .config import ConfigError

        raise ConfigError(f"method.dem_heads: {heads} heads do not divide the T5 width {dim}; use a divisor of {dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        dem = DeviationExtractionModule(dim=dim, redux_dim=redux_dim, heads=heads, mlp_ratio=mlp_ratio,
                                        legacy_s_star=False)
    with torch.no_grad():
        for layer in (dem.self_attn.to_out, dem.cross_attn.to_out, dem.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    return dem


def save_s_star(path: str | Path, s_star: SStar, metadata: dict[str, str] | None = None) -> Path:
    """The S* embedding file: safetensors, key ``t5xxl`` [1, D] (ComfyUI's FLUX tokenizer loads it from
    models/embeddings for ``embedding:<name>``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(s_star.file_state_dict(), str(path), metadata={"format": S_STAR_FORMAT, **(metadata or {})})
    return path


def save_dem(path: str | Path, dem: DeviationExtractionModule, heads: int, embedding: str) -> Path:
    """The DEM file (``format=troupe.dem``, ``heads``, ``embedding`` = the S* file's name; no ``s_star``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in dem.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "troupe.dem", "heads": str(heads), "embedding": embedding})
    return path


# --------------------------------------------------------------------------- the method (on training/reference.py)

SLOT = "troupe_aligngen_s_star_slot"  # the placeholder embedding the caption tokens carry where S* goes


class T5Encoder:
    """ComfyUI's frozen FLUX T5 (the CLIP's ``t5xxl`` model) run on a token list whose S* entries hold the live
    vector, as ComfyUI runs it for an ``embedding:`` word (``SDClipModel.forward``: the vector is placed in T5's
    input sequence), with gradients reaching S*. A plain object, so the frozen T5 stays out of the trained modules."""

    def __init__(self, clip):
        self.clip = clip
        self.model = clip.cond_stage_model.t5xxl
        self.model.requires_grad_(False)
        self.width = int(self.table().shape[1])

    def table(self) -> torch.Tensor:
        return self.model.transformer.get_input_embeddings().weight

    def __call__(self, tokens: list) -> torch.Tensor:
        """T5's output [1, L, D] for one token list (ints and [D] vectors)."""
        self.clip.cond_stage_model.reset_clip_options()
        if not torch.is_grad_enabled():
            return self.model([tokens])[0]
        encoder = self.model.transformer.encoder
        hooks = [encoder.register_forward_pre_hook(lambda _m, args: (args[0].as_subclass(OutOfPlace), *args[1:])),
                 encoder.register_forward_hook(lambda _m, _a, out: tuple(
                     o.as_subclass(torch.Tensor) if isinstance(o, torch.Tensor) else o for o in out))]
        try:
            return self.model([tokens])[0]
        finally:
            for h in hooks:
                h.remove()


class SlotTokenizer:
    """The CLIP's own T5 tokenizer reading one placeholder embedding (``SLOT``, zeros) from a folder of the run, so a
    training caption with S* is split and tokenised exactly as ComfyUI tokenises ``embedding:<S*> label`` in a
    prompt at inference."""

    def __init__(self, clip, folder: Path, width: int):
        import copy

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"t5xxl": torch.zeros(1, width)}, str(folder / f"{SLOT}.safetensors"))
        self.tokenizer = copy.copy(clip.tokenizer.t5xxl)
        self.tokenizer.embedding_directory = [str(folder)]

    def encode(self, caption: str, words: Sequence[str]) -> tuple[list, list[int], list[list[int]], str]:
        """(T5 tokens with a placeholder at each S*, S* positions, per subject [S*, label positions], the prompt):
        S* goes right before the first whole-word occurrence of each subject's word (Sec. 3.2 of AlignGen)."""
        from ..models.reference.branch import label_positions, token_ids
        from ..models.reference.dem import EmbeddingsAsIds, star_positions

        prompt, written = caption, []
        for word in words:
            m = whole_word(word).search(prompt)
            written.append(m.group(0) if m else word)
            if m is not None and not prompt[:m.start()].endswith(f"embedding:{SLOT} "):
                lead = "" if m.start() == 0 or prompt[m.start() - 1].isspace() else " "
                prompt = prompt[:m.start()] + f"{lead}embedding:{SLOT} " + prompt[m.start():]
        wrapped = EmbeddingsAsIds(self.tokenizer)
        positions, _ = label_positions(wrapped, prompt, written)
        ids = token_ids(wrapped, prompt)
        stars = star_positions([i == -1 for i in ids], positions, written)
        tokens = [t[0] for batch in self.tokenizer.tokenize_with_weights(prompt) for t in batch]
        return tokens, stars, [[s] + list(p) for s, p in zip(stars, positions)], prompt


def redux_tokens(clip_vision, style_model, pixels: torch.Tensor) -> torch.Tensor:
    """FLUX Redux tokens [B, N, D] of images [B, H, W, 3], as CLIPVisionEncode + StyleModelApply make them."""
    with torch.inference_mode():
        out = clip_vision.encode_image(pixels)
        return style_model.get_cond(out).float().clone()


@dataclass
class AlignGenSample(ReferenceSample):
    """A reference sample with AlignGen's draws: the caption's T5 tokens with S* slots, each subject's Redux
    tokens (black when its reference was dropped) and what was drawn."""

    t5_tokens: list | None = None  # None: the text was dropped (CFG), no S* and no DEM
    stars: list[int] = field(default_factory=list)
    concept: list[list[int]] = field(default_factory=list)
    redux: torch.Tensor | None = None  # [S, N, Dr]
    dropped: tuple[bool, ...] = ()
    words: tuple[str, ...] = ()
    prompt: str = ""


class AlignGenTrainModule(ReferenceTrainModule):
    """The reference LoRA plus S* (``s_star``) and the DEM (``dem``); flow matching only (AlignGen has no attention
    loss). Per sample: T5 runs on the caption with the live S* in its input, the DEM replaces T5's output at each
    S* position with S*' (Eqs. 3-5 of AlignGen, ``align_tokens``), and the selective cross-modal mask (Eq. 6)
    lets only [S*, label tokens] of subject j attend to reference j; references at t = 0
    (``ReferenceOptions.timestep``)."""

    method = METHOD

    def __init__(self, lora, s_star: SStar, dem: DeviationExtractionModule, encoder: T5Encoder, options):
        super().__init__(lora, options, LossSettings(0.0, 0.0))
        self.s_star, self.dem = s_star, dem
        self.__dict__["encoder"] = encoder  # not a submodule: the frozen T5 is not trained or wrapped by DDP

    def prepare_sample(self, base, sample):
        if getattr(sample, "t5_tokens", None) is None:
            return sample, None, None
        stars = set(sample.stars)
        row = self.s_star.vector[0]
        t5 = self.encoder([row if i in stars else t for i, t in enumerate(sample.t5_tokens)])
        t5 = t5.to(row.device, torch.float32)
        redux = [sample.redux[j][None].to(t5) for j in range(len(sample.stars))]
        context = align_tokens(self.dem, t5, redux, sample.stars, sample.concept)[0]
        return dataclasses.replace(sample, context=context), [sample.concept], [[]]

    def forward(self, base, samples, alpha: float = 0.0, align_weight: float = 0.0) -> dict:
        out = super().forward(base, samples, alpha, align_weight)
        if torch.is_grad_enabled():  # S* and the DEM get a (zero) gradient even when every text was dropped
            extra = [p.float().sum() for p in (*self.s_star.parameters(), *self.dem.parameters())]
            out["loss"] = out["loss"] + 0.0 * torch.stack(extra).sum().to(out["loss"].device)
        return out


def load_redux(trainer, c):
    """The Redux style model: ``Components.style_model`` when the caller gives one, else ``model.redux`` through
    ComfyUI's ``load_style_model`` (a path or a name in models/style_models)."""
    import os

    given = getattr(c, "style_model", None)
    if given is not None:
        return given
    from .config import ConfigError

    name = trainer.config.model.redux
    import folder_paths

    path = name if os.path.exists(name) else folder_paths.get_full_path("style_models", name)
    if not path:
        raise ConfigError(f"model.redux: no file {name!r} in models/style_models; put flux1-redux-dev.safetensors "
                          "there or give its path")
    import comfy.sd

    return comfy.sd.load_style_model(path)


class AlignGenMethod(ReferenceMethod):
    """``method.name = "aligngen"`` on the reference-branch trainer (training/reference.py): the draws (concept
    substitution, reference dropout), the Redux cache, S* + DEM + LoRA, and the three files."""

    name = METHOD

    def setup_models(self, trainer, c) -> None:
        from .config import ConfigError

        if getattr(c, "clip_vision", None) is None:
            raise ConfigError("model.clip_vision: aligngen needs the SigLIP encoder FLUX Redux takes "
                              "(sigclip_vision_patch14_384.safetensors)")
        self.clip_vision, self.style_model = c.clip_vision, load_redux(trainer, c)
        self.encoder = T5Encoder(c.clip)
        size = trainer.config.data.resolution
        self.black_redux = redux_tokens(self.clip_vision, self.style_model, torch.zeros(1, size, size, 3))[0]
        if self.black_redux.shape[-1] != self.encoder.width:
            raise ConfigError(f"model.redux: its tokens are {self.black_redux.shape[-1]} wide, T5's output "
                              f"{self.encoder.width}; use the Redux model made for this FLUX (txt_in_features)")
        self.evaluating = False
        super().setup_models(trainer, c)

    def module_for(self, trainer, c, lora):
        m = trainer.config.method
        start = s_star_start(c.clip.tokenizer.t5xxl, self.encoder.table(), m.s_star_init)
        dem = new_dem(self.encoder.width, int(self.black_redux.shape[-1]), m.dem_heads, m.dem_mlp_ratio,
                      trainer.config.train.seed)
        options = ReferenceOptions(positions=SAME_INDEX, selective_text=True)  # Eq. 6; t_ref = 0
        return AlignGenTrainModule(lora, SStar(start), dem, self.encoder, options)

    def setup_data(self, trainer, c) -> None:
        from .data import DiskCache, module_fingerprint

        super().setup_data(trainer, c)
        cfg = trainer.config
        cache = Path(cfg.data.cache_dir or (Path(cfg.train.output_dir) / "cache"))
        self.slots = SlotTokenizer(c.clip, cache / "aligngen-slot", self.encoder.width)
        self.redux_cache = DiskCache(cache, "aligngen-redux",
                                     module_fingerprint(getattr(self.clip_vision, "model", None),
                                                        self.style_model.model),
                                     (cfg.data.resolution, REFERENCE_FILL))
        if trainer.main:  # one process fills the cache (as the reference features); the others read it
            for i in range(len(trainer.records)):
                self.redux(trainer, i)
        trainer.acc.wait_for_everyone()
        size = cfg.data.resolution
        with torch.inference_mode():
            self.black_latent = trainer.encoders.vae.encode(torch.zeros(1, size, size, 3))[0].float().clone()

    def redux(self, trainer, i: int) -> torch.Tensor:
        """Record i's Redux tokens [S, N, D]: each subject's first reference as the node prepares it."""
        from .data import prepare

        def compute():
            p = prepare(trainer.records[i], trainer.config.data.resolution)
            pixels = torch.stack([prepare_reference_image(r[0], None, trainer.config.data.resolution,
                                                              REFERENCE_FILL) for r in p.references])
            return {"redux": redux_tokens(self.clip_vision, self.style_model, pixels)}

        return self.redux_cache.get(trainer.records[i], compute)["redux"]

    def sample_at(self, trainer, position: int):
        from .trainer import EVAL_STREAM

        self.evaluating = position >= EVAL_STREAM  # the fixed evaluation batch draws nothing
        return super().sample_at(trainer, position)

    def draw(self, trainer, sample, gen: torch.Generator):
        import dataclasses

        from .config import ConfigError

        m = trainer.config.method
        record = trainer.records[sample.record]
        substitution = 0.0 if self.evaluating else m.concept_substitution
        rate = 0.0 if self.evaluating else m.reference_dropout
        caption, words = record.caption, []
        for s in record.subjects:  # "Training Strategy": random concept-name substitution
            caption, word = substitute_concept(caption, s.label, concept_names(s), substitution, gen)
            words.append(word)
        dropped = tuple(draw_reference_dropout(gen, rate) for _ in record.subjects)  # reference dropout
        references, redux = sample.references.clone(), self.redux(trainer, sample.record).clone()
        for j, d in enumerate(dropped):
            if d:
                references[j], redux[j] = self.black_latent, self.black_redux
        tokens, stars, concept, prompt = None, [], [], ""
        if sample.context is not trainer.empty["context"]:  # the text was not dropped for CFG
            try:
                tokens, stars, concept, prompt = self.slots.encode(caption, words)
            except ValueError as e:
                raise ConfigError(f"data.manifest: line {record.line}: {e} (caption {caption!r}); write each "
                                  "subject's label in the caption as it names the subject") from None
        fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)}
        fields.update(references=references, labels=tuple(words))
        return AlignGenSample(**fields, t5_tokens=tokens, stars=stars, concept=concept, redux=redux,
                               dropped=dropped, words=tuple(words), prompt=prompt)

    def save_extra(self, trainer, path: Path) -> None:
        """Beside the LoRA: ``<stem>.dem.safetensors`` (models/troupe) and ``<s_star_name>.safetensors``
        (models/embeddings)."""
        m = trainer.config.method
        module = trainer.unwrapped()
        dem_path = save_dem(Path(path).with_name(Path(path).stem + ".dem.safetensors"), module.dem, m.dem_heads,
                            m.s_star_name)
        save_s_star(Path(path).with_name(f"{m.s_star_name}.safetensors"), module.s_star,
                    {"method": METHOD, "dem": dem_path.name})
