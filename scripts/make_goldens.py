"""Regenerate the golden parity files in tests/goldens/ by running each format's official code.

Every golden holds fixed inputs, the official implementation's outputs on them, and (in its metadata) the
upstream repository and commit it came from. The official code is never part of this repository: it is
imported at run time from the checkouts given on the command line (a git checkout, or a folder with a
``.commit`` file naming the commit). Run from the repository root::

    PYTHONPATH=tests:/path/to/extra .host/venv/bin/python scripts/make_goldens.py \\
        --tencent ~/src/IP-Adapter --cubiq ~/src/ComfyUI_IPAdapter_plus --msdiffusion ~/src/MS-Diffusion \\
        --instantx ~/src/ComfyUI-IPAdapter-Flux --xflux ~/src/x-flux --mosaic ~/src/MOSAIC

``/path/to/extra`` holds what the official code imports beyond the host venv (diffusers 0.35, peft,
accelerate, opencv-python-headless, installed with ``pip install --no-deps --target``). Formats whose
checkout is not given are skipped. Weights are the tests' tiny random fixtures (tests/fixtures), in each
format's real key layout; the tests rebuild them from the same seeds and check them against the stored copy.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "goldens"

# --------------------------------------------------------------------------- shared inputs

SDXL_LAYER = ("output", 2, 0)  # file index 13 (7th module in file order), cubiq's transformer_index 7
SDXL_LAYER_FILE_INDEX = "13"
SDXL_TRANSFORMER_INDEX = 7
SDXL_WIDTH, SDXL_HEADS = 128, 2
SDXL_LATENT = (12, 20)  # latent h, w; the layer runs at /2: token grid 6 x 10 (non-square)
SDXL_GRID = (6, 10)
# three overlapping boxes (x0, y0, x1, y1), edges on the 6 x 10 grid so a bilinear resize of the pixel mask
# (cubiq) and the area coverage (pack) agree exactly
IP_BOXES = ((0.0, 0.0, 0.6, 4 / 6), (0.4, 2 / 6, 1.0, 1.0), (0.2, 1 / 6, 0.8, 5 / 6))
# MS-Diffusion only supports square grids (int(sqrt(P)) in its processor): 8 x 8, fractional edges
MS_GRID = 8
MS_BOXES = ((0.05, 0.1, 0.6, 0.7), (0.4, 0.3, 0.95, 0.9), (0.2, 0.0, 0.8, 0.5))
MS_TEXT = 8  # text tokens (77 in SDXL; the processor takes the count as text_tokens)
SUBJECT_WEIGHTS = (1.0, 0.5, 1.5)
FLUX_LATENT = (6, 10)  # token grid 3 x 5
FLUX_TEXT = 8
FLUX_SIGMA = 0.7
FLUX_GUIDANCE = 3.5
FLUX_CONTEXT = 256  # the adapters' token width (4096 in the real files; any width loads)
FLUX_WEIGHT = 2.0


def randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def upstream(alias: str, root: Path) -> str:
    """Register ``root`` as an importable package named ``alias`` (its __init__ is not run); returns alias."""
    pkg = types.ModuleType(alias)
    pkg.__path__ = [str(root)]
    sys.modules[alias] = pkg
    return alias


def source(root: Path) -> dict[str, str]:
    """The repository (``.repo`` file or the folder name) and commit of a checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = (root / ".commit").read_text().strip() if (root / ".commit").exists() else "unknown"
    repo = (root / ".repo").read_text().strip() if (root / ".repo").exists() else root.name
    return {"repository": repo, "commit": commit}


def save(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu", v.dtype if v.dtype == torch.uint8 else torch.float32).contiguous()
            for k, v in tensors.items()}
    save_file(flat, str(OUT / f"{name}.safetensors"), metadata={**meta, "script": "scripts/make_goldens.py"})
    print(f"wrote tests/goldens/{name}.safetensors ({sum(v.numel() for v in flat.values())} values)")


def box_pixel_masks(boxes, h: int, w: int) -> torch.Tensor:
    """Binary masks [N, h, w] of boxes on a pixel grid whose edges fall on pixel boundaries."""
    out = torch.zeros(len(boxes), h, w)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)] = 1.0
    return out


# --------------------------------------------------------------------------- IP-Adapter SDXL


def ip_adapter(tencent: Path, cubiq: Path) -> None:
    """tencent-ailab/IP-Adapter: Resampler / ImageProjModel and the unconditional prompt; cubiq: masked attention."""
    from fixtures.sdxl_adapters import ip_adapter_plus_state_dict, ip_adapter_sdxl_state_dict

    ta = upstream("tencent_ip_adapter", tencent / "ip_adapter")
    resampler_mod = importlib.import_module(f"{ta}.resampler")
    ip_mod = importlib.import_module(f"{ta}.ip_adapter")
    ca = upstream("cubiq_ipadapter", cubiq)
    patch_mod = importlib.import_module(f"{ca}.CrossAttentionPatch")
    plus_mod = importlib.import_module(f"{ca}.IPAdapterPlus")

    gen = torch.Generator().manual_seed(100)
    n, g, e = 3, 10, 64
    tensors: dict[str, torch.Tensor] = {}
    plus_sd = ip_adapter_plus_state_dict(seed=1)
    base_sd = ip_adapter_sdxl_state_dict(seed=2)
    # Plus: the perceiver on the penultimate hidden states; uncond = the encoded all-zero normalised image
    # (tencent's IPAdapterPlus.get_image_embeds: image_encoder(torch.zeros_like(clip_image)))
    res = resampler_mod.Resampler(dim=64, depth=2, dim_head=64, heads=1, num_queries=4, embedding_dim=e,
                                  output_dim=2048, ff_mult=4)
    res.load_state_dict({k[len("image_proj."):]: v for k, v in plus_sd.items() if k.startswith("image_proj.")})
    feats, uncond_feats = randn(gen, n, g, e), randn(gen, 1, g, e)
    with torch.no_grad():
        plus_tokens, plus_uncond = res(feats), res(uncond_feats)
    # base: ImageProjModel on the projected embeds; uncond = zero embeds (IPAdapter.get_image_embeds)
    proj = ip_mod.ImageProjModel(cross_attention_dim=2048, clip_embeddings_dim=48, clip_extra_context_tokens=4)
    proj.load_state_dict({k[len("image_proj."):]: v for k, v in base_sd.items() if k.startswith("image_proj.")})
    embeds = randn(gen, n, 48)
    with torch.no_grad():
        base_tokens, base_uncond = proj(embeds), proj(torch.zeros_like(embeds[:1]))
    tensors.update(plus_features=feats, plus_uncond_features=uncond_feats, plus_tokens=plus_tokens,
                   plus_uncond_tokens=plus_uncond, base_embeds=embeds, base_tokens=base_tokens,
                   base_uncond_tokens=base_uncond)

    # one attn2 call with cubiq's Attn2Replace: a masked IP-Adapter term per subject (one apply node each)
    p = SDXL_GRID[0] * SDXL_GRID[1]
    q, k, v = randn(gen, 2, p, SDXL_WIDTH), randn(gen, 2, 77, SDXL_WIDTH), randn(gen, 2, 77, SDXL_WIDTH)
    px = (SDXL_LATENT[0] * 8, SDXL_LATENT[1] * 8)
    masks = box_pixel_masks(IP_BOXES, *px)
    extra = {"n_heads": SDXL_HEADS, "sigmas": torch.tensor([5.0, 5.0]), "cond_or_uncond": [1, 0],
             "block": SDXL_LAYER[:2], "block_index": SDXL_LAYER[2], "transformer_index": SDXL_TRANSFORMER_INDEX,
             "original_shape": [2, 4, *SDXL_LATENT]}
    tensors.update(q=q, k=k, v=v, masks=masks, boxes=torch.tensor(IP_BOXES), subject_weights=torch.tensor(SUBJECT_WEIGHTS))
    weight = 0.8
    layer_weights = "0:0.5, 4:1.0, 7:1.2, 9:0.3"

    for kind, sd, cond, uncond in (("plus", plus_sd, plus_tokens, plus_uncond), ("base", base_sd, base_tokens,
                                                                              base_uncond)):
        idx = SDXL_LAYER_FILE_INDEX
        kv = {f"{idx}.to_k_ip.weight": sd[f"ip_adapter.{idx}.to_k_ip.weight"],
              f"{idx}.to_v_ip.weight": sd[f"ip_adapter.{idx}.to_v_ip.weight"]}
        layers = plus_mod.To_KV(kv)
        ipa = types.SimpleNamespace(ip_layers=layers)
        ipa.get_multigpu_clone = lambda device, ipa=ipa: ipa

        def attn2(weights, idx=idx, ipa=ipa, cond=cond, uncond=uncond) -> torch.Tensor:
            patch = None
            for i in range(n):
                kwargs = {"module_key": idx, "ipadapter": ipa, "weight": weights[i], "cond": cond[i:i + 1],
                          "cond_alt": None, "uncond": uncond, "weight_type": "linear", "mask": masks[i:i + 1],
                          "sigma_start": 1e9, "sigma_end": 0.0, "unfold_batch": False, "embeds_scaling": "V only"}
                if patch is None:
                    patch = patch_mod.Attn2Replace(patch_mod.ipadapter_attention, **kwargs)
                else:
                    patch.add(patch_mod.ipadapter_attention, **kwargs)
            with torch.no_grad():
                return patch(q.clone(), k, v, dict(extra))

        scaled = [weight * s for s in SUBJECT_WEIGHTS]
        tensors[f"{kind}_out"] = attn2(scaled)
        # per-layer weights as IPAdapter_plus parses ``layer_weights`` ("index:weight, ..." times the weight)
        per_layer = [{int(a): float(b) * w for a, b in (x.split(":") for x in layer_weights.split(","))}
                     for w in scaled]
        tensors[f"{kind}_out_layer_weights"] = attn2(per_layer)
        missing = [{0: w} for w in scaled]  # this layer (index 7) absent: no image term
        tensors[f"{kind}_out_layer_absent"] = attn2(missing)
        tensors[f"{kind}_to_k_ip_rows"] = kv[f"{idx}.to_k_ip.weight"][:4]  # fingerprint of the fixture layer
    meta = {f"tencent_{k}": v for k, v in source(tencent).items()}
    meta.update({f"cubiq_{k}": v for k, v in source(cubiq).items()})
    meta.update(weight=str(weight), layer_weights=layer_weights, layer="output 2 0 (file index 13)",
                fixtures="ip_adapter_plus_state_dict(seed=1), ip_adapter_sdxl_state_dict(seed=2)")
    save("ip_adapter_sdxl", tensors, meta)


def clip_preprocessing(tencent: Path, msdiffusion: Path) -> None:
    """CLIPImageProcessor as IP-Adapter (resize short side, centre crop) and MS-Diffusion (stretch first) use it."""
    import transformers
    from PIL import Image
    from transformers import CLIPImageProcessor

    gen = torch.Generator().manual_seed(101)
    processor = CLIPImageProcessor()  # what both repositories instantiate (224 px, OpenAI mean / std)
    tensors = {}
    for name, (h, w) in (("landscape", (224, 320)), ("portrait", (320, 224))):
        # smooth content (a coarse random field, bilinear upsampled): resampling filters then agree closely
        coarse = torch.rand(1, 3, h // 16, w // 16, generator=gen)
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        image = (smooth[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
        tensors[f"{name}_image"] = image
        pil = Image.fromarray(image.numpy())
        tensors[f"{name}_ip_adapter"] = processor(images=pil, return_tensors="pt").pixel_values
        # MS-Diffusion's training set resizes every reference to a square first (resize_ref=True), then the
        # processor; its inference script does the same at 512 px
        square = pil.resize((512, 512), Image.BILINEAR)
        tensors[f"{name}_ms_diffusion"] = processor(images=square, return_tensors="pt").pixel_values
    meta = {f"tencent_{k}": v for k, v in source(tencent).items()}
    meta.update({f"msdiffusion_{k}": v for k, v in source(msdiffusion).items()})
    meta["processor"] = f"transformers {transformers.__version__} CLIPImageProcessor()"
    save("clip_preprocessing", tensors, meta)


# --------------------------------------------------------------------------- MS-Diffusion


def ms_diffusion(root: Path) -> None:
    """MS-Diffusion's grounding Resampler and MaskedIPAttnProcessor2_0 on three overlapping subjects."""
    from diffusers.models.attention_processor import Attention
    from fixtures.sdxl_adapters import ms_diffusion_state_dict

    ms = upstream("ms_diffusion", root / "msdiffusion")
    projection = importlib.import_module(f"{ms}.models.projection")
    processors = importlib.import_module(f"{ms}.models.attention_processor")
    sd = ms_diffusion_state_dict(seed=3)
    gen = torch.Generator().manual_seed(102)
    n, g, e = 3, 10, 64
    res = projection.Resampler(dim=64, depth=2, dim_head=64, heads=1, num_queries=4, embedding_dim=e,
                               output_dim=2048, ff_mult=4, latent_init_mode="grounding", phrase_embeddings_dim=768)
    res.load_state_dict({k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")})
    feats, phrases = randn(gen, n, g, e), randn(gen, n, 768)
    boxes = torch.tensor(MS_BOXES)
    with torch.no_grad():
        tokens = res(feats, grounding_kwargs={"boxes": boxes, "phrase_embeds": phrases, "drop_grounding_tokens": [0]})

    attn = Attention(query_dim=SDXL_WIDTH, cross_attention_dim=2048, heads=SDXL_HEADS, dim_head=64, bias=False,
                     out_bias=True)
    with torch.no_grad():
        for prm in attn.parameters():
            prm.copy_(randn(gen, *prm.shape, std=0.05))
    idx = SDXL_LAYER_FILE_INDEX
    proc = processors.MaskedIPAttnProcessor2_0(hidden_size=SDXL_WIDTH, cross_attention_dim=2048, scale=0.6,
                                               num_tokens=4, text_tokens=MS_TEXT, num_dummy_tokens=4)
    proc.to_k_ip.weight.data = sd[f"ms_adapter.{idx}.to_k_ip.weight"].clone()
    proc.to_v_ip.weight.data = sd[f"ms_adapter.{idx}.to_v_ip.weight"].clone()
    attn.set_processor(proc)
    p = MS_GRID * MS_GRID
    hidden, text = randn(gen, 2, p, SDXL_WIDTH), randn(gen, 2, MS_TEXT, 2048)
    dummy = sd["dummy_image_tokens"]
    image_tokens = torch.cat([dummy, tokens.reshape(1, -1, 2048)], dim=1)
    # MSAdapter.generate: uncond first (zero image prompt, zero boxes), then cond
    ehs = torch.cat([torch.cat([text[:1], torch.zeros_like(image_tokens)], 1), torch.cat([text[1:], image_tokens], 1)])
    batch_boxes = torch.stack([torch.zeros_like(boxes), boxes])
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=ehs, boxes=batch_boxes)
        proc.subject_scales = list(SUBJECT_WEIGHTS)
        out_scales = attn(hidden, encoder_hidden_states=ehs, boxes=batch_boxes)
    with torch.no_grad():  # the text keys / values as ComfyUI hands them to an attn2 replace
        k_text, v_text = attn.to_k(text), attn.to_v(text)
    tensors = {"features": feats, "phrases": phrases, "boxes": boxes, "tokens": tokens, "hidden": hidden,
               "k_text": k_text, "v_text": v_text, "out": out, "out_subject_scales": out_scales,
               "subject_weights": torch.tensor(SUBJECT_WEIGHTS), "to_q": attn.to_q.weight,
               "to_out_weight": attn.to_out[0].weight, "to_out_bias": attn.to_out[0].bias,
               "to_k_ip_rows": proc.to_k_ip.weight[:4]}
    save("ms_diffusion", tensors, {**source(root), "scale": "0.6", "layer": "output 2 0 (file index 13)",
                                   "fixture": "ms_diffusion_state_dict(seed=3)",
                                   "batch": "row 0 uncond (zero boxes, zero image prompt), row 1 cond"})


# --------------------------------------------------------------------------- FLUX (tiny DiT)


def flux_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"x": randn(gen, 1, 16, *FLUX_LATENT), "context": randn(gen, 1, FLUX_TEXT, 4096),
            "y": randn(gen, 1, 768), "timestep": torch.tensor([FLUX_SIGMA]), "guidance": torch.tensor([FLUX_GUIDANCE])}


def tiny_flux_fingerprint(dm) -> dict[str, torch.Tensor]:
    sd = dm.state_dict()
    return {"dit_img_in": sd["img_in.weight"], "dit_single_linear2": sd["single_blocks.1.linear2.weight"]}


def instantx(root: Path) -> None:
    """InstantX's FLUX IP-Adapter through its ComfyUI port: MLPProjModel, IPAFluxAttnProcessor2_0 in every
    double and single block (FluxUpdateModules), two subjects chained as two apply nodes."""
    from fixtures.flux_adapters import instantx_state_dict
    from fixtures.goldens import golden_flux

    port = upstream("instantx_port", root)
    upstream("instantx_port.flux", root / "flux")
    ipa = importlib.import_module(f"{port}.ipadapter_flux")
    procs_mod = importlib.import_module(f"{port}.attention_processor")
    utils = importlib.import_module(f"{port}.utils")
    nested = instantx_state_dict(pooled=48, context=FLUX_CONTEXT, tokens=4, hidden=64, layers=4, seed=8,
                                 dtype=torch.float32)
    proj = ipa.MLPProjModel(cross_attention_dim=FLUX_CONTEXT, id_embeddings_dim=48, num_tokens=4)
    proj.load_state_dict(nested["image_proj"])
    weight = FLUX_WEIGHT
    names = [f"double_blocks.{i}" for i in range(2)] + [f"single_blocks.{i}" for i in range(2)]
    procs = {name: procs_mod.IPAFluxAttnProcessor2_0(hidden_size=64, cross_attention_dim=FLUX_CONTEXT, num_tokens=4,
                                                     scale=weight, timestep_range=None) for name in names}
    torch.nn.ModuleList(procs.values()).load_state_dict(nested["ip_adapter"])
    gen = torch.Generator().manual_seed(103)
    pooled = randn(gen, 2, 48)
    inputs = flux_inputs(gen)
    model = golden_flux()
    bi = model.clone()
    with torch.no_grad():
        embeds = [proj(pooled[i:i + 1]) for i in range(2)]
        utils.FluxUpdateModules(bi, procs, embeds[0], False)
        utils.FluxUpdateModules(bi, procs, embeds[1], True)
        bi.patch_model()
        try:
            out = bi.model.diffusion_model(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"],
                                           guidance=inputs["guidance"])
        finally:
            bi.unpatch_model()
    tensors = {**inputs, "pooled": pooled, "out": out, **tiny_flux_fingerprint(model.model.diffusion_model)}
    tensors.update({f"adapter.image_proj.{k}": v for k, v in nested["image_proj"].items()})
    tensors.update({f"adapter.ip_adapter.{k}": v for k, v in nested["ip_adapter"].items()})
    save("instantx_flux", tensors, {**source(root), "weight": str(weight), "model": "golden_flux()",
                                    "subjects": "2, each its own ApplyIPAdapterFlux (chained), no mask"})


def xlabs(root: Path) -> None:
    """XLabs' FLUX IP-Adapter: x-flux's Flux with IPDoubleStreamBlockProcessor on every double block."""
    from fixtures.flux_adapters import xlabs_state_dict
    from fixtures.goldens import golden_flux
    from fixtures.tiny_models import TINY_FLUX_DIT

    xf = upstream("xflux", root / "src" / "flux")
    model_mod = importlib.import_module(f"{xf}.model")
    layers = importlib.import_module(f"{xf}.modules.layers")
    c = TINY_FLUX_DIT
    params = model_mod.FluxParams(in_channels=c["in_channels"] * 4, vec_in_dim=c["vec_in_dim"],
                                  context_in_dim=c["context_in_dim"], hidden_size=c["hidden_size"],
                                  mlp_ratio=c["mlp_ratio"], num_heads=c["num_heads"], depth=c["depth"],
                                  depth_single_blocks=c["depth_single_blocks"], axes_dim=c["axes_dim"],
                                  theta=c["theta"], qkv_bias=c["qkv_bias"], guidance_embed=c["guidance_embed"])
    flux = model_mod.Flux(params)
    comfy_model = golden_flux()
    flux.load_state_dict(comfy_model.model.diffusion_model.state_dict(), strict=True)
    sd = xlabs_state_dict(pooled=48, context=FLUX_CONTEXT, tokens=4, hidden=64, double=2, seed=9)
    improj = layers.ImageProjModel(FLUX_CONTEXT, 48, 4)
    improj.load_state_dict({k[len("ip_adapter_proj_model."):]: v for k, v in sd.items()
                            if k.startswith("ip_adapter_proj_model.")})
    procs = {}
    for name, proc in flux.attn_processors.items():  # as XFluxPipeline.set_ip builds them
        if name.startswith("double_blocks"):
            i = name.split(".")[1]
            ip = layers.IPDoubleStreamBlockProcessor(FLUX_CONTEXT, 64)
            ip.load_state_dict({k[len(f"double_blocks.{i}.processor."):]: v for k, v in sd.items()
                                if k.startswith(f"double_blocks.{i}.processor.")})
            procs[name] = ip
        else:
            procs[name] = proc
    flux.set_attn_processor(procs)
    gen = torch.Generator().manual_seed(104)
    embeds = randn(gen, 1, 48)
    inputs = flux_inputs(gen)
    x = inputs["x"]
    b, ch, h, w = x.shape
    img = x.reshape(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), ch * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    weight = FLUX_WEIGHT
    with torch.no_grad():
        out = flux(img=img, img_ids=ids.reshape(1, -1, 3), txt=inputs["context"],
                   txt_ids=torch.zeros(1, FLUX_TEXT, 3), timesteps=inputs["timestep"], y=inputs["y"],
                   guidance=inputs["guidance"], image_proj=improj(embeds), ip_scale=weight)
    out = out.reshape(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)
    tensors = {**inputs, "embeds": embeds, "out": out, **tiny_flux_fingerprint(comfy_model.model.diffusion_model)}
    tensors.update({f"adapter.{k}": v for k, v in sd.items()})
    save("xlabs_flux", tensors, {**source(root), "weight": str(weight), "model": "golden_flux() weights",
                                 "subjects": "1 (x-flux takes one image prompt)"})


def mosaic(root: Path) -> None:
    """MOSAIC's transformer_forward (src/flux_omini.py) with its reference LoRA on diffusers' FLUX model: two
    references at inference.py's position deltas, timestep 0 and guidance 1, group mask without ref-to-ref."""
    import comfy.utils
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from fixtures.goldens import golden_flux
    from fixtures.reference_loras import mosaic_lora_state_dict
    from fixtures.tiny_models import TINY_FLUX_DIT

    mo = upstream("mosaic", root / "src")
    omini = importlib.import_module(f"{mo}.flux_omini")
    c = TINY_FLUX_DIT
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=c["in_channels"] * 4, num_layers=c["depth"],
                                         num_single_layers=c["depth_single_blocks"],
                                         attention_head_dim=c["hidden_size"] // c["num_heads"],
                                         num_attention_heads=c["num_heads"], joint_attention_dim=c["context_in_dim"],
                                         pooled_projection_dim=c["vec_in_dim"], guidance_embeds=True,
                                         axes_dims_rope=tuple(c["axes_dim"]))
    comfy_model = golden_flux()
    comfy_sd = comfy_model.model.diffusion_model.state_dict()
    dsd = {}
    for dkey, spec in comfy.utils.flux_to_diffusers(c).items():  # ComfyUI's own FLUX key map
        if (spec if isinstance(spec, str) else spec[0]) not in comfy_sd:
            continue  # controlnet-only keys
        if isinstance(spec, str):
            dsd[dkey] = comfy_sd[spec]
        elif spec[1] is None:
            dsd[dkey] = spec[2](comfy_sd[spec[0]])
        else:
            dim, start, size = spec[1]
            dsd[dkey] = comfy_sd[spec[0]].narrow(dim, start, size)
    dsd = {k: v for k, v in dsd.items() if k in transformer.state_dict()}
    transformer.load_state_dict(dsd, strict=True)
    lora = mosaic_lora_state_dict(rank=4, seed=7)
    FluxPipeline.load_lora_into_transformer(lora, network_alphas=None, transformer=transformer, adapter_name="subject")
    transformer.set_adapters(["subject"], [1.0])
    transformer.eval()

    gen = torch.Generator().manual_seed(105)
    inputs = flux_inputs(gen)
    ref_latents = [randn(gen, 1, 16, 8, 8), randn(gen, 1, 16, 8, 8)]
    ref_size = 8 * 8  # pixels of an 8 x 8 latent
    fake = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(preprocess=lambda image: image.latent),
        vae=types.SimpleNamespace(encode=lambda x: types.SimpleNamespace(latent_dist=types.SimpleNamespace(
            sample=lambda: x)), config=types.SimpleNamespace(shift_factor=0.0, scaling_factor=1.0)),
        device=torch.device("cpu"), dtype=torch.float32, _pack_latents=FluxPipeline._pack_latents,
        _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)
    ref_tokens, ref_ids = [], []
    for i, lat in enumerate(ref_latents):
        image = types.SimpleNamespace(size=(ref_size, ref_size), latent=lat)  # the "VAE" returns the latent
        cond = omini.Condition(image, "subject", position_delta=[0, -(ref_size * (i + 1)) // 16])  # inference.py
        t, ids = cond.encode(fake)
        ref_tokens.append(t)
        ref_ids.append(ids)
    x = inputs["x"]
    x_tokens = FluxPipeline._pack_latents(x, 1, 16, *FLUX_LATENT)
    x_ids = FluxPipeline._prepare_latent_image_ids(1, FLUX_LATENT[0] // 2, FLUX_LATENT[1] // 2, "cpu", torch.float32)
    n_cond = len(ref_latents)
    group_mask = torch.ones([n_cond + 2, n_cond + 2], dtype=torch.bool)  # as generate() builds it
    group_mask[2:, 2:] = torch.diag(torch.tensor([1] * n_cond))
    t, g = inputs["timestep"], inputs["guidance"]
    with torch.no_grad():
        out = omini.transformer_forward(
            transformer, image_features=[x_tokens, *ref_tokens], text_features=[inputs["context"]],
            img_ids=[x_ids, *ref_ids], txt_ids=[torch.zeros(FLUX_TEXT, 3)],
            timesteps=[t, t] + [torch.zeros([1])] * n_cond, pooled_projections=[inputs["y"]] * (2 + n_cond),
            guidances=[g, g] + [torch.ones([1])] * n_cond, adapters=[None, None] + ["subject"] * n_cond,
            group_mask=group_mask)[0]
    out = FluxPipeline._unpack_latents(out, FLUX_LATENT[0] * 8, FLUX_LATENT[1] * 8, 8)
    tensors = {**inputs, "out": out, "ref_latent_0": ref_latents[0][0], "ref_latent_1": ref_latents[1][0],
               "ref_ids_0": ref_ids[0], "ref_ids_1": ref_ids[1], **tiny_flux_fingerprint(comfy_model.model.diffusion_model)}
    save("mosaic_reference", tensors, {**source(root), "model": "golden_flux() weights",
                                       "lora": "mosaic_lora_state_dict(rank=4, seed=7)",
                                       "references": "2 latents 16x8x8, position_delta [0, -(64 (i + 1)) // 16]"})


# --------------------------------------------------------------------------- SigLIP pooled output


def siglip() -> None:
    """transformers' SiglipVisionModel (what InstantX encodes with): its ``pooler_output`` on a tiny model."""
    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    torch.manual_seed(106)
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():  # away from the init so every weight matters
            prm.add_(torch.randn(prm.shape) * 0.05)
    gen = torch.Generator().manual_seed(107)
    pixels = randn(gen, 2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(pixel_values=pixels, last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output)
    save("siglip_pooling", tensors, {"repository": "huggingface/transformers", "commit": f"v{transformers.__version__}",
                                     "config": config.to_json_string(use_diff=False)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("tencent", "cubiq", "msdiffusion", "instantx", "xflux", "mosaic"):
        ap.add_argument(f"--{name}", type=Path, help=f"checkout of the {name} repository")
    args = ap.parse_args()
    import conftest  # noqa: F401  (registers the pack as comfyui_troupe; tests/ must be on PYTHONPATH)
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    torch.manual_seed(0)
    if args.tencent and args.cubiq:
        ip_adapter(args.tencent, args.cubiq)
    if args.tencent and args.msdiffusion:
        clip_preprocessing(args.tencent, args.msdiffusion)
    if args.msdiffusion:
        ms_diffusion(args.msdiffusion)
    if args.instantx:
        instantx(args.instantx)
    if args.xflux:
        xlabs(args.xflux)
    if args.mosaic:
        mosaic(args.mosaic)
    siglip()


if __name__ == "__main__":
    main()
