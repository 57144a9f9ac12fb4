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

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..models.reference.dem import DeviationExtractionModule

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
