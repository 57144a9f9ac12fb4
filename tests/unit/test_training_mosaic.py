"""MOSAIC on the tiny FLUX models (CPU): the reference LoRA trained through the inference branch code, the
semantic correspondence attention loss and the multi-reference disentanglement loss against hand computations
(MOSAIC: Multi-Subject Personalized Generation via Correspondence-Aware Alignment and Disentanglement; only its
abstract is public), the manifest's correspondences, the DINO pseudo-correspondence helper, a 60-step run and
resume."""
from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.pasted_msbench import photo, resized
from fixtures.training import SIZE
from fixtures.training_flux import block_calls, flux_components, tiny_training_flux
from fixtures.training_mosaic import mosaic_config, mosaic_dataset
from safetensors.torch import load_file

from comfyui_troupe.models.reference.branch import (
    AS_TRAINED,
    STATE_KEY,
    ReferenceBranch,
    ReferenceOptions,
    prepare_reference_image,
    trained_positions,
)
from comfyui_troupe.models.reference.hooks import ReferencePatch, prepare_stream
from comfyui_troupe.models.reference.lora import FluxDims, load_reference_lora
from comfyui_troupe.training.flux import FrozenFlux
from comfyui_troupe.training.manifest import ManifestError, read_manifest
from comfyui_troupe.training.reference import (
    AttentionProbe,
    LossSettings,
    ReferenceSample,
    ReferenceTrainModule,
    TrainableReferenceLoRA,
    attention_probs,
    correspondence_loss,
    disentanglement_loss,
    flux_attention,
    mosaic_modules,
    reference_token,
    subject_maps,
    target_token,
)
from comfyui_troupe.training.trainer import EVAL_STREAM, Trainer, comfy_training_mode, train

STEPS = 60
LN = math.log


# --------------------------------------------------------------------------- the losses by hand


def test_attention_probs_and_correspondence_loss_by_hand():
    """One target row, 3 reference tokens, d = 4 (sqrt(d) = 2), 2 heads.
    Head 1: q = (2, 0, 0, 0), keys (ln 3, 0, 0, 0), 0, 0 -> logits (ln 3, 0, 0) -> softmax (3/5, 1/5, 1/5).
    Head 2: q = 0 -> (1/3, 1/3, 1/3). Mean over heads: (7/15, 4/15, 4/15).
    Cross-entropy against token 0: -ln(7/15) = 0.7621; against token 1: -ln(4/15) = 1.3218."""
    q = torch.zeros(1, 2, 1, 4)
    q[0, 0, 0, 0] = 2.0
    k = torch.zeros(1, 2, 3, 4)
    k[0, :, 0, 0] = LN(3)
    probs = attention_probs(q, k)[0]
    assert torch.allclose(probs, torch.tensor([[7 / 15, 4 / 15, 4 / 15]]), atol=1e-6)
    assert abs(float(correspondence_loss(probs, torch.tensor([0]))) - (-LN(7 / 15))) < 1e-6
    assert abs(float(correspondence_loss(probs, torch.tensor([1]))) - (-LN(4 / 15))) < 1e-6
    # two rows: the mean of the rows' cross-entropies
    two = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    assert abs(float(correspondence_loss(two, torch.tensor([0, 2]))) - (-(LN(0.5) + LN(0.3)) / 2)) < 1e-6


def test_correspondence_loss_falls_as_attention_moves_onto_the_corresponding_token():
    """Scaling the query along the corresponding key's direction moves attention onto it: the loss falls
    monotonically towards 0; moving it onto another token raises it."""
    k = torch.eye(4)[None, None, :3]  # 3 reference tokens, orthogonal keys
    values = []
    for a in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0):
        q = torch.tensor([[[[a, 0.0, 0.0, 0.0]]]])
        values.append(float(correspondence_loss(attention_probs(q, k)[0], torch.tensor([0]))))
    assert values[0] == pytest.approx(LN(3), abs=1e-6)  # uniform over 3 tokens
    assert all(b < a for a, b in itertools.pairwise(values)), values
    assert values[-1] < 0.01
    away = float(correspondence_loss(attention_probs(torch.tensor([[[[0.0, 4.0, 0, 0]]]]), k)[0], torch.tensor([0])))
    assert away > LN(3)


def test_subject_maps_and_disentanglement_by_hand():
    """subject_maps sums each subject's key columns. Disentanglement = mean over pairs of cos^2:
    disjoint (1,1,0,0) vs (0,0,1,1): 0; identical up to scale: 1 (the maximum); (1,1,0) vs (0,1,1): cos 1/2 -> 0.25;
    three subjects (1,0,0), (1,1,0), (0,0,1): cos^2 = 1/2, 0, 0 -> mean 1/6."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.3], [0.0, 0.5, 0.1, 0.2, 0.2]])
    owners = torch.tensor([-1, -1, 0, 0, 1])
    assert torch.allclose(subject_maps(probs, owners, 2), torch.tensor([[0.4, 0.3], [0.3, 0.2]]), atol=1e-7)
    assert float(disentanglement_loss(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))) == 0.0
    a = torch.tensor([0.2, 0.4, 0.1, 0.0])
    assert float(disentanglement_loss(torch.stack([a, 2 * a]))) == pytest.approx(1.0, abs=1e-6)
    assert float(disentanglement_loss(torch.tensor([[1.0, 1, 0], [0, 1, 1]]))) == pytest.approx(0.25, abs=1e-6)
    three = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert float(disentanglement_loss(three)) == pytest.approx(1 / 6, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # non-negative maps: always within [0, 1], identical ones at the top
        m = torch.rand(2, 7, generator=g)
        assert 0.0 <= float(disentanglement_loss(m)) <= 1.0 + 1e-6
    assert float(disentanglement_loss(torch.rand(1, 7))) == 0.0  # one subject: nothing to separate


def _toy_qk():
    """2-subject toy in a joint attention: 1 text, 2 image, reference 1 (2 tokens), reference 2 (1 token); d = 1,
    1 head. Keys (0, 0, 0, ln 2, 0, ln 3); image row 1 has q = 1, image row 2 has q = 0."""
    k = torch.tensor([0.0, 0.0, 0.0, LN(2), 0.0, LN(3)]).view(1, 1, 6, 1)
    q = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 3, 1)
    return q, k


def test_probe_reads_the_right_rows_and_columns_on_a_two_subject_toy():
    """Image row 1: logits (0, 0, 0, ln 2, 0, ln 3) -> exp (1, 1, 1, 2, 1, 3) / 9: mass on subject 1 = 3/9, on
    subject 2 = 3/9. Image row 2 (q = 0): 1/6 each: 2/6 and 1/6. Maps a_1 = (1/3, 1/3), a_2 = (1/3, 1/6):
    cos = (1/9 + 1/18) / (sqrt(2)/3 * sqrt(5)/6) = 3 / sqrt(10), cos^2 = 0.9.
    Correspondences: image token 0 -> subject 1's token 0 (softmax over (ln 2, 0) = (2/3, 1/3): -ln(2/3));
    image token 1 -> subject 2's token 0 (its only token: 0). Mean over the 2 points: ln(3/2) / 2 = 0.2027."""
    q, k = _toy_qk()
    points = [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([1]), torch.tensor([0]))]

    def attention(q_, k_, v_, pe=None, mask=None, transformer_options=None):
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2).flatten(2)

    probe = AttentionProbe(attention, [("double", 0)], n_txt=1, n_img=2, ref_lengths=[2, 1], points=points,
                           max_rows=256)
    probe.enter("double", 1)  # a block the losses do not read
    probe(q, k, k)
    assert probe.correspondence == [] and probe.disentangle == []
    probe.enter("double", 0)
    out = probe(q, k, k, pe=None, mask=None)
    assert torch.equal(out, attention(q, k, k))  # the block's attention is unchanged
    probe(q, k, k)  # a second call in the same block (a reference's own queries) is not read
    assert len(probe.correspondence) == 1 and len(probe.disentangle) == 1
    assert float(probe.correspondence[0]) == pytest.approx(LN(3 / 2) / 2, abs=1e-6)
    assert float(probe.disentangle[0]) == pytest.approx(0.9, abs=1e-6)


# --------------------------------------------------------------------------- where the points land


def test_reference_token_follows_prepare_reference_image():
    """A red dot at a normalised point of a 40 x 60 reference lands, after the node's preparation (on a white
    square, 90% fill, resized to 64), in the token reference_token names (4 x 4 tokens of 16 px)."""
    for x, y in ((0.1, 0.2), (0.5, 0.5), (0.85, 0.9), (0.3, 0.75)):
        img = torch.zeros(40, 60, 3)
        cy, cx = int(y * 40), int(x * 60)
        img[cy - 1:cy + 2, cx - 1:cx + 2, 0] = 1.0
        out = prepare_reference_image(img, None, 64)
        score = out[..., 0] - out[..., 1]  # red and not white
        iy, ix = divmod(int(score.flatten().argmax()), 64)
        assert reference_token((x, y), (40, 60), (4, 4)) == (iy // 16) * 4 + ix // 16, (x, y)


def test_target_token_goes_through_the_square_crop():
    """A 100 x 200 target is cropped to its centre 100 x 100 (columns 50-150): x = 0.3 -> (60 - 50) / 100 = 0.1 ->
    token column 0 of 4; x = 0.7 -> 0.9 -> column 3; y = 0.6 -> row 2; x = 0.2 (column 40) is cut off."""
    assert target_token((0.3, 0.6), (100, 200), 64, (4, 4)) == 2 * 4 + 0
    assert target_token((0.7, 0.6), (100, 200), 64, (4, 4)) == 2 * 4 + 3
    assert target_token((0.2, 0.6), (100, 200), 64, (4, 4)) is None


def test_manifest_correspondences_are_validated_with_line_numbers(tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    good = {"image": "a.png", "caption": "a dog", "subjects": [
        {"label": "dog", "box": [0, 0, 1, 1], "references": "crop", "correspondences": [[0.1, 0.2, 0.3, 0.4]]}]}
    bad = json.loads(json.dumps(good))
    bad["subjects"][0]["correspondences"] = [[0.1, 0.2, 0.3], [0.1, 0.2, 1.5, 0.1]]
    worse = json.loads(json.dumps(good))
    worse["subjects"][0]["correspondences"] = "all"
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, worse)) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    text = str(e.value)
    assert "m.jsonl line 2: subject 1: \"correspondences\" entry 1, 2 is not [ref_x, ref_y, target_x, target_y]" in text
    assert "m.jsonl line 3: subject 1: \"correspondences\" must be a list" in text
    path.write_text(json.dumps(good) + "\n")
    (record,) = read_manifest(path)
    assert record.subjects[0].correspondences == ((0.1, 0.2, 0.3, 0.4),)


# --------------------------------------------------------------------------- the trainable branch


def _sample(seed: int = 0, subjects: int = 2) -> ReferenceSample:
    g = torch.Generator().manual_seed(seed)
    return ReferenceSample(latent=torch.randn(16, 8, 8, generator=g), context=torch.randn(7, 64, generator=g),
                           pooled=torch.randn(768, generator=g), references=torch.randn(subjects, 16, 8, 8, generator=g),
                           points=[(torch.tensor([0, 5]), torch.tensor([3, 1])), (torch.tensor([10]), torch.tensor([2]))],
                           noise=torch.randn(16, 8, 8, generator=g), sigma=0.6, drop_image=False)


class _InferenceInjection:
    """The node's route: ``prepare_stream`` with a run dict, then ``ReferencePatch.dit_block`` on every block."""

    def __init__(self, patch, stream, run):
        self.patch, self.stream, self.run = patch, stream, run

    def prepare(self, double, single, head_dim, device, dtypes):
        pass  # the stream was prepared with the run dict, as the node does

    def replaces(self, double, single, checkpointed=False):
        out = {}
        for kind, count in (("double_block", double), ("single_block", single)):
            for i in range(count):
                def fn(a, e, _k=(kind, i)):
                    to = dict(a["transformer_options"], **{STATE_KEY: {id(self.patch): self.stream}})
                    return self.patch.dit_block(_k, dict(a, transformer_options=to), e, self.run)
                out[(kind, i)] = fn
        return out


def test_training_forward_gives_the_inference_numbers_and_lora_gradients():
    """The training forward (fresh stream, LoRA parameters, probe at every block) gives the same prediction as the
    node's inference route with the saved file loaded by ``load_reference_lora`` (bit for bit), differs from no
    LoRA, and every LoRA parameter that can reach the output gets a gradient."""
    base = tiny_training_flux().model
    frozen = FrozenFlux(base, "cpu")
    dims = FluxDims.from_model(base.diffusion_model)
    lora = TrainableReferenceLoRA(dims, 4, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora.up.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    module = ReferenceTrainModule(lora, losses=LossSettings(0.1, 0.1, "all", 256))
    sample = _sample()
    with comfy_training_mode():
        out = module(frozen, [sample])
        ups = list(lora.up.values())
        for term in ("correspondence", "disentangle"):  # each attention term alone reaches the LoRA
            grads = torch.autograd.grad(out[term], ups, retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().max() > 0 for g in grads), term
        out["loss"].backward()
    # the last single block's linear2 only writes the reference stream after the last block, which nothing reads
    last = f"single_blocks__{len(base.diffusion_model.single_blocks) - 1}__linear2"
    for name, p in lora.named_parameters():
        if name.endswith(last):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    corr, dis = float(out["correspondence"].detach()), float(out["disentangle"].detach())
    assert corr > 0 and 0 < dis <= 1
    assert float(out["loss"].detach()) == pytest.approx(float(out["diffusion"].detach()) + 0.1 * corr + 0.1 * dis,
                                                        rel=1e-6)

    def inference(lora_file):
        branch = ReferenceBranch(dit=base.diffusion_model, latents=[base.process_latent_in(r[None])[0]
                                                                    for r in sample.references],
                                 ref_subject=[0, 1], lora=lora_file,
                                 options=ReferenceOptions(positions=trained_positions(AS_TRAINED, "troupe")))
        run: dict = {}
        stream = prepare_stream(branch, torch.zeros(1, 16, 8, 8), sample.pooled[None], flux_attention(), run)
        stream.n_txt = sample.context.shape[0]
        with torch.no_grad():
            pred, target = frozen.predict([sample], _InferenceInjection(ReferencePatch(branch, flux_attention()),
                                                                        stream, run))
        return torch.nn.functional.mse_loss(pred, target)

    loaded = load_reference_lora(lora.troupe_state_dict(), dims)
    assert (loaded.format, loaded.rank, loaded.modules()) == ("troupe", 4, mosaic_modules(dims))
    assert torch.equal(inference(loaded), out["diffusion"].detach())
    assert not torch.equal(inference(None), out["diffusion"].detach())  # the LoRA is in the numbers


def test_a_batch_with_every_reference_dropped_still_backpropagates():
    base = tiny_training_flux().model
    lora = TrainableReferenceLoRA(FluxDims.from_model(base.diffusion_model), 4)
    module = ReferenceTrainModule(lora)
    sample = _sample()
    sample.drop_image = True
    out = module(FrozenFlux(base, "cpu"), [sample])
    out["loss"].backward()
    assert torch.equal(out["loss"], out["diffusion"])
    assert all(p.grad is not None and not p.grad.any() for p in lora.parameters())


# --------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def dataset(module_tmp, msbench) -> Path:
    return mosaic_dataset(module_tmp / "mosaic" / "data", msbench)


@pytest.fixture(scope="module")
def mosaic_run(dataset, module_tmp):
    config = mosaic_config(module_tmp / "run60", dataset)
    trainer = Trainer(config, flux_components(), show_bar=False)
    initial = {k: v.detach().clone() for k, v in trainer.unwrapped().state_dict().items()}
    result = trainer.run()
    return config, trainer, result, initial


def test_config_defaults_and_refusals(dataset, tmp_path):
    from comfyui_troupe.training.config import ConfigError

    cfg = mosaic_config(tmp_path, dataset, train={"learning_rate": 1e-4})
    m = cfg.method
    assert (m.lora_rank, m.correspondence_weight, m.disentangle_weight, m.attention_layers, m.attention_rows) == (
        16, 0.1, 0.1, "double", 256)
    assert cfg.model.clip_vision == ""  # the reference branch needs no CLIP vision
    assert (cfg.train.lr_schedule, cfg.train.weight_decay) == ("constant", 1e-4)
    with pytest.raises(ConfigError, match="method.attention_layers: expected"):
        mosaic_config(tmp_path, dataset, method={"attention_layers": "middle"})
    with pytest.raises(ConfigError, match="method.attention_layers: double_blocks.7 is not in this model"):
        Trainer(mosaic_config(tmp_path, dataset, method={"attention_layers": "double_blocks.7"}), flux_components(),
                show_bar=False)


def test_samples_carry_the_manifest_correspondences(mosaic_run):
    """Every manifest point reaches the sample as (target token, reference token) through the cached sizes: the
    target's square crop and the reference file's own size (read here with PIL)."""
    from PIL import Image

    _, trainer, _, _ = mosaic_run
    for position in range(4):
        s = trainer.sample_at(position)
        record = trainer.records[s.record]
        assert s.references.shape == (2, 16, 8, 8) and len(s.points) == 2
        with Image.open(record.image) as im:
            w, h = im.size
        for subject, (tgt, ref) in zip(record.subjects, s.points):
            if subject.crop_from_target:
                from comfyui_troupe.training.data import box_pixels

                top, bottom, left, right = box_pixels(subject.box, h, w)
                size = (bottom - top, right - left)
            else:
                with Image.open(subject.references[0]) as im:
                    size = (im.size[1], im.size[0])
            assert tgt.tolist() == [target_token(p[2:], (h, w), SIZE, (4, 4)) for p in subject.correspondences]
            assert ref.tolist() == [reference_token(p[:2], size, (4, 4)) for p in subject.correspondences]
            assert len(tgt) == 16  # the crop of the 128 px targets keeps every point (boxes inside the square)


def test_mosaic_run_lowers_the_loss_and_changes_only_the_lora(mosaic_run):
    """60 steps, fixed seed: the mean training loss of the last 10 steps is below the first 10 (measured 1.72 ->
    1.41), the fixed-batch diffusion loss falls, the base stays bit-identical (the run trained a copy; the copy's
    weights equal a fresh fixture model's), and every trained tensor is a LoRA tensor."""
    _config, trainer, result, initial = mosaic_run
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first * 0.9, (first, last)
    evals = [r["eval_diffusion"] for r in result.log if r.get("eval_diffusion", "") != ""]
    assert evals[-1] < evals[0], evals
    fresh = tiny_training_flux(1).model.state_dict()
    for k, v in trainer.base_model.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    final = trainer.unwrapped().state_dict()
    assert set(final) == set(initial) and all(k.startswith("lora.") for k in final)
    dead = f"single_blocks__{len(trainer.frozen.dit.single_blocks) - 1}__linear2"  # writes nothing anyone reads
    for k in final:
        if k.startswith("lora.up."):
            assert torch.equal(final[k], initial[k]) == k.endswith(dead), k


def test_training_lowers_the_correspondence_loss(mosaic_run):
    """On the fixed evaluation batch, the trained LoRA's correspondence cross-entropy is below the initial one
    (the LoRA starts at the base weights: up = 0)."""
    _config, trainer, _, initial = mosaic_run
    samples = [trainer.sample_at(EVAL_STREAM + i) for i in range(4)]
    module = trainer.unwrapped().eval()
    with torch.no_grad(), comfy_training_mode():
        trained = module(trainer.frozen, samples)
        start = ReferenceTrainModule(TrainableReferenceLoRA(FluxDims.from_model(trainer.frozen.dit), 16),
                                     losses=module.losses)
        start.load_state_dict(initial)
        before = start(trainer.frozen, samples)
    assert float(trained["correspondence"]) < float(before["correspondence"]), (before, trained)


def test_saved_lora_loads_as_the_node_reads_it(mosaic_run):
    config, trainer, result, _ = mosaic_run
    dims = FluxDims.from_model(trainer.frozen.dit)
    for path in (result.adapter_path, Path(config.train.output_dir) / "checkpoint-0000030" / "adapter.safetensors"):
        lora = load_reference_lora(load_file(str(path)), dims)
        assert (lora.format, lora.rank, lora.modules()) == ("troupe", 16, mosaic_modules(dims))
    saved = load_file(str(result.adapter_path))
    module = trainer.unwrapped()
    assert torch.equal(saved["double_blocks.0.img_attn.qkv.lora_up.weight"], module.lora.up["double_blocks__0__img_attn__qkv"].detach())


def test_resume_at_the_checkpoint_reproduces_the_uninterrupted_run(mosaic_run, dataset, tmp_path):
    """Resuming at step 30 gives the same LoRA at step 60 within 1e-6 (the same data, noise and optimiser state;
    float32 sums in another order may differ in the last bits)."""
    config, _, result, _ = mosaic_run
    work = tmp_path / "resumed"
    (work / "run").mkdir(parents=True)
    shutil.copytree(Path(config.train.output_dir) / "checkpoint-0000030", work / "run" / "checkpoint-0000030")
    resumed = train(mosaic_config(work, dataset, train={"resume": "latest"}), flux_components(), show_bar=False)
    assert resumed.steps == STEPS
    a, b = load_file(str(result.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_gradient_checkpointing_recomputes_every_block_and_gives_the_same_weights(dataset, tmp_path, monkeypatch):
    """4 MOSAIC steps (both attention losses on, half the references dropped) with every block recomputed in the
    backward pass give the LoRA and the logged losses of the plain run within 1e-6 (float32 sums in another
    order). The recomputation must restart from the block's reference hidden states, which the forward replaced:
    restarting from the replaced ones moves the weights by up to lr x steps = 4e-2. Each block runs twice per
    training forward with references with checkpointing (the forward and its recomputation), once without; a
    forward whose references were dropped has nothing to train through the blocks, so nothing is recomputed."""
    branches = {"n": 0}
    inner = ReferenceTrainModule.branch
    probes = []
    probe_init = AttentionProbe.__init__

    def recorded(self, *a, **k):
        probe_init(self, *a, **k)
        probes.append(self)

    monkeypatch.setattr(AttentionProbe, "__init__", recorded)

    def counted(self, *a, **k):
        branches["n"] += torch.is_grad_enabled()
        return inner(self, *a, **k)

    monkeypatch.setattr(ReferenceTrainModule, "branch", counted)
    files, counts, logs, with_refs = {}, {}, {}, {}
    for gc in (False, True):
        comps = flux_components()
        calls, hooks = block_calls(comps.base_model.diffusion_model)
        branches["n"] = 0
        config = mosaic_config(tmp_path / f"gc{gc}", dataset, steps=4,
                               train={"gradient_checkpointing": gc, "checkpoint_every": 4},
                               dropout={"image": 0.5}, method={"attention_layers": "all"})
        try:
            result = train(config, comps, show_bar=False)
        finally:
            for h in hooks:
                h.remove()
        files[gc], counts[gc], with_refs[gc] = load_file(str(result.adapter_path)), dict(calls), branches["n"]
        logs[gc] = list(csv.DictReader((Path(config.train.output_dir) / "log.csv").open()))
    forwards = 4 * 2  # 4 steps of batch 2, one forward per sample
    assert counts[False] == {"double": forwards, "single": forwards}, counts
    assert with_refs[False] == with_refs[True] and 0 < with_refs[True] < forwards, with_refs  # both kinds ran
    recomputed = forwards + with_refs[True]
    assert counts[True] == {"double": recomputed, "single": recomputed}, counts
    assert files[False].keys() == files[True].keys()
    for k in files[False]:
        assert torch.allclose(files[False][k], files[True][k], atol=1e-6, rtol=0), k
    # the recomputation replays the probe's reads without keeping them: one term per layer and forward
    layers = 2 + 2  # attention_layers "all" on the tiny DiT
    assert probes and all(len(p.correspondence) == len(p.disentangle) == layers for p in probes), [
        (len(p.correspondence), len(p.disentangle)) for p in probes]
    assert len(logs[False]) == len(logs[True])
    for col in ("loss", "correspondence", "disentangle", "eval_diffusion"):
        plain, ckpt = ([float(row[col]) for row in logs[gc] if row[col] not in ("", "nan")] for gc in (False, True))
        assert plain and plain == pytest.approx(ckpt, abs=1e-6), col


# --------------------------------------------------------------------------- pseudo-correspondences


def test_mutual_matches_on_constructed_features():
    """Reference features e0, e1, e2, e3; target features: e1 (t0), e0 + 0.1 e1 (t1), e2 scaled (t2), 0.3 e3 + e0
    (t3). Nearest neighbours: r0 -> t1 (cos 0.995) vs t3 (0.958), t1 -> r0: mutual; r1 -> t0 (1.0), t0 -> r1:
    mutual; r2 -> t2 (1.0): mutual; r3 -> t3 (0.287) but t3 -> r0 (0.958): not mutual. Threshold 0.999 keeps the
    two exact pairs only; a target mask without t0 leaves r1 unpaired."""
    from comfyui_troupe.training.correspondence import mutual_matches

    e = torch.eye(4)
    tgt = torch.stack([e[1], e[0] + 0.1 * e[1], 3 * e[2], 0.3 * e[3] + e[0]])
    pairs = mutual_matches(e, tgt, 0.0)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (1, 0), (2, 2)]
    assert pairs[0][2] == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)
    assert [(i, j) for i, j, _ in mutual_matches(e, tgt, 0.999)] == [(1, 0), (2, 2)]
    assert [(i, j) for i, j, _ in mutual_matches(e, tgt, 0.0, torch.tensor([False, True, True, True]))] == [
        (0, 1), (2, 2)]


def pixel_dino(folder: Path, patch: int = 14) -> Path:
    """A DINOv2 folder whose patch tokens are the patch's own pixels: no transformer layers, the patch embedding the
    identity (3 x 14 x 14 = 588 wide), no position embedding, the final layer norm 1/0. Cosine similarity of two
    tokens is then the correlation of the two patches' pixels: a deterministic feature that really finds a photo
    moved by whole patches (a tiny random DINO would find nothing), through the real loader."""
    from transformers import Dinov2Config, Dinov2Model

    width = 3 * patch * patch
    model = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=0, num_attention_heads=12,
                                     patch_size=patch, image_size=224)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embeddings.patch_embeddings.projection.weight.copy_(torch.eye(width).view(width, 3, patch, patch))
        model.layernorm.weight.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_correspond_recovers_a_photo_pasted_at_a_known_offset(tmp_path, msbench):
    """MS-Bench's dog photo (224 x 224) pasted into a grey 224 x 224 target at (x, y) = (70, 42) px, 5 and 3 patches
    of 14: reference patch (i, j) is target patch (i + 3, j + 5). ``troupe_train.py correspond`` (the CLI, the real
    DINO loader) must propose only true pairs (target = reference + (70, 42) / 224) and recover at least 95% of the
    13 x 11 = 143 overlapping patches (measured: all 143), and write them into a manifest that validates."""
    from PIL import Image

    from comfyui_troupe.training import cli

    spec = json.loads((msbench / "msbench.json").read_text())
    ref = resized(photo(msbench, spec["subjects"]["dog"]["image"]), 224, 224)
    dy, dx = 42, 70
    target = torch.full((224, 224, 3), 0.5)
    target[dy:, dx:] = ref[:224 - dy, :224 - dx]
    for name, img in (("ref.png", ref), ("target.png", target)):
        Image.fromarray((img.numpy() * 255).round().astype("uint8")).save(tmp_path / name)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "target.png", "caption": "a dog", "subjects": [
        {"label": "dog", "box": [dx / 224, dy / 224, 1.0, 1.0], "references": ["ref.png"]}]}) + "\n")
    folder = pixel_dino(tmp_path / "pixel-dino")
    out = tmp_path / "out" / "with_points.jsonl"
    assert cli.main(["correspond", str(manifest), "--dino", str(folder), "--threshold", "0.5", "--out", str(out)]) == 0
    (record,) = read_manifest(out)  # paths rebased to the new folder
    pairs = record.subjects[0].correspondences
    wrong = [p for p in pairs if abs(p[2] - p[0] - dx / 224) > 1e-5 or abs(p[3] - p[1] - dy / 224) > 1e-5]
    assert not wrong and len(pairs) >= 0.95 * 143, (len(pairs), wrong[:3])
    assert all(p[2] >= dx / 224 and p[3] >= dy / 224 for p in pairs)  # inside the box
    # without --out the manifest itself is rewritten (the default threshold is 0.5 too)
    assert cli.main(["correspond", str(manifest), "--dino", str(folder)]) == 0
    assert read_manifest(manifest)[0].subjects[0].correspondences == pairs
    assert cli.main(["correspond", str(manifest)]) == 2  # no DINO named: a clear refusal
