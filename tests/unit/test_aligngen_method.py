"""Method "aligngen" on the reference-branch trainer (tiny FLUX models, CPU; AlignGen: Personalized Image Generation
via Cross-Modality Prior Alignment, Secs. 3.1-3.3, "Training Strategy").

What trains: S* (a T5 input embedding), the DEM and the rank-16 reference LoRA; the FLUX base (its image branch
included), T5 and CLIP-L stay bit-identical. Reference tokens run at t = 0 with the selective cross-modal mask
(Eq. 6). The draws of the data stream happen at the configured rates. A 60-step run lowers the loss, and the three
files it writes load in TroupeReferenceBranch and run through ComfyUI's sampler.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import ensure_comfy
from fixtures.training_aligngen import PARENTS, STEPS, aligngen_components, aligngen_config, aligngen_dataset
from fixtures.training_flux import block_calls, tiny_training_flux
from safetensors.torch import load_file

from comfyui_troupe.training.config import ConfigError, parse_config
from comfyui_troupe.training.trainer import EVAL_STREAM, Trainer


@pytest.fixture(scope="module")
def dataset(module_tmp, msbench) -> Path:
    return aligngen_dataset(module_tmp / "aligngen" / "data", msbench)


@pytest.fixture(scope="module")
def run(dataset, module_tmp):
    config = aligngen_config(module_tmp / "run60", dataset)
    c = aligngen_components()
    frozen_text = {k: v.detach().clone() for k, v in c.clip.cond_stage_model.state_dict().items()}
    trainer = Trainer(config, c, show_bar=False)
    initial = {k: v.detach().clone() for k, v in trainer.unwrapped().state_dict().items()}
    result = trainer.run()
    return config, trainer, result, initial, frozen_text, c


def test_config_needs_redux_and_siglip_and_has_the_papers_defaults(dataset, tmp_path):
    cfg = aligngen_config(tmp_path, dataset, train={"learning_rate": 1e-4})
    assert (cfg.train.weight_decay, cfg.train.optimizer, cfg.method.lora_rank, cfg.method.reference_dropout) == (
        0.01, "adamw", 16, 0.5)
    for key, missing in (("redux", "model.redux"), ("clip_vision", "model.clip_vision")):
        data = {"model": {"unet": "u", "clip_l": "c", "t5": "t", "vae": "v", "clip_vision": "s", "redux": "r"},
                "method": {"name": "aligngen"}, "data": {"manifest": str(dataset)},
                "train": {"output_dir": str(tmp_path / "o"), "steps": 1}}
        del data["model"][key]
        with pytest.raises(ConfigError, match=f'^{missing}: required when method.name is "aligngen"'):
            parse_config(data, tmp_path)


def test_the_data_stream_draws_at_the_configured_rates(run):
    """1,000 draws of the data stream (fixed seed): a subject's reference is black at method.reference_dropout
    (0.5) and its label is substituted at method.concept_substitution (0.5), both within 4 binomial standard
    deviations (see test_aligngen_training); every S* sits right before its subject's word in the T5 tokens and
    the concept positions start with it; the evaluation stream draws nothing."""
    _, trainer, *_ = run
    method = trainer.method
    n, dropped, substituted = 0, 0, 0
    for position in range(500):
        s = trainer.sample_at(position)
        record = trainer.records[s.record]
        for j, subject in enumerate(record.subjects):
            n += 1
            dropped += s.dropped[j]
            if s.dropped[j]:
                assert torch.equal(s.references[j], method.black_latent)
                assert torch.equal(s.redux[j], method.black_redux)
            else:
                assert torch.equal(s.redux[j], method.redux(trainer, s.record)[j])
            substituted += s.words[j] != subject.label
            assert s.words[j] in (subject.label, *PARENTS[subject.label])
            assert s.concept[j][0] == s.stars[j] and s.concept[j][1] == s.stars[j] + 1
            assert torch.is_tensor(s.t5_tokens[s.stars[j]])
    assert n == 1000
    tol = 4 * math.sqrt(n * 0.25)
    assert abs(dropped - 500) <= tol and abs(substituted - 500) <= tol, (dropped, substituted)
    e = trainer.sample_at(EVAL_STREAM)
    assert not any(e.dropped) and all(w == s.label for w, s in zip(e.words, trainer.records[e.record].subjects))


def test_the_forward_uses_s_star_in_t5s_input_the_dem_and_the_selective_mask(run):
    """One sample by hand: T5 on the prompt with S* placed in its input equals the context the module feeds the DiT
    before the DEM; the DEM changes only the S* rows; the stream's text positions are [S*, label tokens] per subject
    (Eq. 6) and the references run at t = 0."""
    from comfyui_troupe.models.reference.dem import align_tokens

    _, trainer, _, _, _, c = run
    module = trainer.unwrapped()
    s = trainer.sample_at(EVAL_STREAM + 1)
    assert module.options.selective_text and module.options.timestep == 0.0
    with torch.no_grad():
        prepared, positions, blocked = module.prepare_sample(trainer.frozen, s)
        embeds = c.clip.cond_stage_model.t5xxl.process_tokens(
            [[module.s_star.vector[0] if i in s.stars else t for i, t in enumerate(s.t5_tokens)]], "cpu")[0]
        assert all(torch.equal(embeds[0, p], module.s_star.vector[0]) for p in s.stars)
        t5 = c.clip.cond_stage_model.t5xxl.transformer.encoder(embeds, attention_mask=None, dtype=torch.float32)[0]
        redux = [s.redux[j][None] for j in range(len(s.stars))]
        torch.testing.assert_close(prepared.context, align_tokens(module.dem, t5, redux, s.stars, s.concept)[0],
                                   atol=1e-5, rtol=1e-5)  # the same modules; float order in T5's kernels
    other = [i for i in range(t5.shape[1]) if i not in s.stars]
    torch.testing.assert_close(prepared.context[other], t5[0, other], atol=1e-5, rtol=1e-5)
    assert positions == [s.concept] and blocked == [[]]


def test_run_lowers_the_loss_and_changes_only_s_star_the_dem_and_the_lora(run):
    """60 steps, fixed seed: the mean loss of the last 10 steps is below the first 10 (measured 1.335 -> 1.027; the
    fixed evaluation batch 1.333 -> 1.047 -> 1.012 at steps 0, 30, 60); the FLUX base (image branch
    included) equals a fresh fixture model bit for bit, T5 and CLIP-L are unchanged, and every trained tensor is
    S*, the DEM or the reference LoRA, each of which moved."""
    _, trainer, result, initial, frozen_text, c = run
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first * 0.9, (first, last)
    fresh = tiny_training_flux(1).model.state_dict()
    for k, v in trainer.base_model.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    for k, v in c.clip.cond_stage_model.state_dict().items():
        assert torch.equal(v, frozen_text[k]), k
    final = trainer.unwrapped().state_dict()
    assert set(final) == set(initial)
    assert {k.split(".")[0] for k in final} == {"lora", "s_star", "dem"}
    decayed = initial["s_star.vector"] * (1 - 1e-2 * 0.01) ** STEPS  # AdamW's decay alone (a zero gradient)
    assert (final["s_star.vector"] - decayed).abs().max() > 1e-3  # S* learned through T5
    assert not torch.equal(final["dem.cross_attn.to_out.weight"], initial["dem.cross_attn.to_out.weight"])
    assert any(not torch.equal(final[k], initial[k]) for k in final if k.startswith("lora.up."))


def test_saved_files_load_in_troupe_reference_branch_and_sample(run, msbench):
    """The three files as a user installs them (S* in models/embeddings, the DEM and the LoRA in models/troupe) go
    through TroupeReferenceBranch's own work function with a prompt that writes ``embedding:aligngen_s_star``
    before each label, and ComfyUI's sampler runs the patched tiny FLUX with the Redux tokens appended."""
    ensure_comfy()
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import folder_paths
    from fixtures.pasted_msbench import photo, resized
    from fixtures.tiny_models import sample

    from comfyui_troupe.models.layout.subject import Subject
    from comfyui_troupe.models.reference.branch import ReferenceOptions
    from comfyui_troupe.models.reference.dem import REDUX_TOKENS, TokenAlignment
    from comfyui_troupe.nodes.reference_branch import BranchInputs, reference_branch, reference_patches

    config, trainer, result, _, _, c = run
    out = Path(config.train.output_dir)
    lora_path = Path(result.adapter_path)
    dem_path = lora_path.with_name(lora_path.stem + ".dem.safetensors")
    emb_path = lora_path.with_name("aligngen_s_star.safetensors")
    assert dem_path.exists() and emb_path.exists()
    assert torch.equal(load_file(str(emb_path))["t5xxl"], trainer.unwrapped().s_star.vector.detach())
    assert comfy.sd1_clip.load_embed("aligngen_s_star", [str(out)], 4096, "t5xxl").shape == (1, 64)
    folder_paths.add_model_folder_path("troupe", str(out))

    clip = c.clip.clone()
    clip.tokenizer = comfy.text_encoders.flux.FluxTokenizer(embedding_directory=[str(out)])  # DualCLIPLoader's folder
    prompt = "a photo of embedding:aligngen_s_star dog next to embedding:aligngen_s_star teapot"
    spec = json.loads((msbench / "msbench.json").read_text())["subjects"]
    image = {v["class"]: v["image"] for v in spec.values()}
    subjects = [Subject(image=resized(photo(msbench, image[k]), 64, 64)[None], label=k) for k in ("dog", "teapot")]
    model = tiny_training_flux(1)
    inputs = BranchInputs(prompt=prompt, reference_size=64, lora_name=lora_path.name, dem_name=dem_path.name,
                          options=ReferenceOptions(selective_text=True, positions="as trained"))
    patched, report = reference_branch(model, c.vae, subjects, inputs, clip=clip)
    align = reference_patches(patched)[0].branch.dem
    assert isinstance(align, TokenAlignment) and "S* = the T5 input embedding before each label" in report
    assert "LoRA: troupe LoRA, rank 16" in report

    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    g = torch.Generator().manual_seed(0)
    redux = torch.randn(1, 2 * REDUX_TOKENS, 64, generator=g) * 0.1  # what StyleModelApply appends per subject
    positive = [[torch.cat([cond, redux], 1), {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[clip.encode_from_tokens(clip.tokenize("")), {"pooled_output": pooled, "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    with_dem = sample(patched, positive, negative, latent, steps=2)
    assert torch.isfinite(with_dem).all()
    plain = dataclasses.replace(inputs, dem_name="none", lora_name="none")
    without, _ = reference_branch(model, c.vae, subjects, plain, clip=clip)
    other = sample(without, [[torch.cat([cond, redux], 1)[:, :cond.shape[1]], {"pooled_output": pooled,
                                                                             "guidance": 3.5}]],
                   negative, latent, steps=2)
    assert (with_dem - other).abs().max() > 1e-6  # S*', the LoRA and the mask change the result


def test_resume_at_the_checkpoint_reproduces_the_uninterrupted_run(run, dataset, tmp_path):
    """Resuming at step 30 gives the same S*, DEM and LoRA at step 60 within 1e-5 (float32 sums in another order)."""
    import shutil

    config, trainer, *_ = run
    work = tmp_path / "resumed"
    (work / "run").mkdir(parents=True)
    shutil.copytree(Path(config.train.output_dir) / "checkpoint-0000030", work / "run" / "checkpoint-0000030")
    resumed_cfg = aligngen_config(work, dataset, train={"resume": "latest"})
    resumed = Trainer(resumed_cfg, aligngen_components(), show_bar=False)
    resumed.run()
    a, b = trainer.unwrapped().state_dict(), resumed.unwrapped().state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_every_block_and_gives_the_same_weights(dataset, tmp_path):
    """4 AlignGen steps (half the captions dropped, so half the forwards run without S* and the DEM) with every
    block recomputed in the backward pass give the S*, DEM and LoRA of the plain run within 1e-6. Every forward
    keeps its references (AlignGen drops them by blacking the image), so each block runs twice per training
    forward with checkpointing, once without."""
    states, counts = {}, {}
    for gc in (False, True):
        c = aligngen_components()
        calls, hooks = block_calls(c.base_model.diffusion_model)
        config = aligngen_config(tmp_path / f"gc{gc}", dataset, steps=4, dropout={"text": 0.5},
                                 train={"gradient_checkpointing": gc, "checkpoint_every": 4})
        try:
            trainer = Trainer(config, c, show_bar=False)
            trainer.run()
        finally:
            for h in hooks:
                h.remove()
        states[gc], counts[gc] = trainer.unwrapped().state_dict(), dict(calls)
    forwards = 4 * 2  # 4 steps of batch 2, one forward per sample
    assert counts == {False: {"double": forwards, "single": forwards},
                      True: {"double": 2 * forwards, "single": 2 * forwards}}, counts
    assert states[False].keys() == states[True].keys()
    for k in states[False]:
        torch.testing.assert_close(states[True][k], states[False][k], atol=1e-6, rtol=0)
