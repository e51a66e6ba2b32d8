"""The ``structureflow`` adapter: registration, SF / SF* / SF# training steps, the teacher, SF's own losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdinpaint
from kdinpaint import plugins
from kdinpaint.blocks import AdaptiveConv
from kdinpaint.cli import main
from kdinpaint.masking import masked
from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.structureflow import (
    SF_LOSS_WEIGHTS,
    SF_PERCEPTUAL_LAYERS,
    SF_STYLE_LAYERS,
    TEXTURE_LEVELS,
    StructureFlow,
    StructureFlowOutput,
    StructureFlowTeacher,
    StructureFlowTexture,
    StructureFlowVGG,
    checkpoint_filter_fn,
    pack_official,
    rtv_structure,
    sampling_correctness_loss,
    structureflow_loss,
    structureflow_student,
    structureflow_teacher,
)
from tiny import randomised

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
FIXTURE = json.loads((Path(__file__).parent / "structureflow_keys.json").read_text())["networks"]


def _inputs(batch: int = 1, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4 : size // 2 + 4, size // 3 : size // 3 + 14] = 1
    return image, mask



def _same_texture(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.texture.state_dict(), b.texture.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- registration ----------------------------------------------------------------------------------------


def test_adapter_is_listed_with_its_variants(capsys):
    plugins.load_plugins(reload=True)
    assert main(["adapters", "--json"]) == 0
    entry = next(a for a in json.loads(capsys.readouterr().out)["adapters"] if a["name"] == "structureflow")
    assert entry["variants"] == ["hash", "star"] and entry["distribution"] == "kdinpaint"
    adapter = plugins.get_adapter("structureflow")
    assert adapter.stride == 16 and adapter.checkpoint_filter_fn is checkpoint_filter_fn
    released = adapter.spec.variant(None)
    assert released.encoder_levels == [] and released.sites == [] and not released.needs_teacher
    for variant in ("star", "hash"):
        spec = adapter.spec.variant(variant)
        assert spec.encoder_levels == TEXTURE_LEVELS and spec.sites == TEXTURE_LEVELS and spec.needs_teacher


@pytest.mark.parametrize(
    "recipe,variant,student_cls,teacher_cls",
    [
        ("structureflow", None, StructureFlow, StructureFlowTeacher),
        ("structureflow-star", "star", StructureFlow, StructureFlowTeacher),
        ("structureflow-hash", "hash", StructureFlowTexture, StructureFlowTexture),
    ],
)
def test_recipes_build_the_table4_networks(recipe, variant, student_cls, teacher_cls):
    r = load_recipe(RECIPES / f"{recipe}.yaml")
    assert r.model.adapter == "structureflow" + (f":{variant}" if variant else "")
    adapter = plugins.get_adapter("structureflow")
    with torch.device("meta"):  # full width, no memory
        student = adapter.student(variant, **r.model.kwargs)
        teacher = adapter.teacher(variant, **r.model.kwargs)
    assert type(student) is student_cls and type(teacher) is teacher_cls
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    f_gen, s_gen = FIXTURE["f_gen"]["num_parameters"], FIXTURE["s_gen"]["num_parameters"]
    assert n_params(student) == (f_gen if variant == "hash" else f_gen + s_gen)
    assert n_params(teacher) == f_gen  # the texture generator alone
    assert (r.losses.lambda_d > 0) == bool(adapter.spec.variant(variant).encoder_levels)


# ---- one training step per variant ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", [None, pytest.param("star", marks=pytest.mark.slow), "hash"])
def test_one_training_step(variant):
    torch.manual_seed(0)
    adapter = plugins.get_adapter("structureflow")
    spec = adapter.spec.variant(variant)
    student, teacher = adapter.student(variant, dim=8), adapter.teacher(variant, dim=8)
    image, mask = _inputs(2)
    kd = kdinpaint.attach(student, teacher if spec.needs_teacher else None, spec, example_inputs=(image, mask),
                          allow_empty=variant is None)  # StructureFlow as released taps nothing
    theta = [*student.parameters(), *kd.student_parameters()]
    opt = torch.optim.Adam(theta, lr=1e-3)
    before = {n: p.detach().clone() for n, p in student.texture.named_parameters()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    pred = student(masked(image, mask), mask)
    terms = kd.losses(target=image)
    loss = (pred - image).abs().mean() + 20 * terms["total"]
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert pred.shape == image.shape and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in theta if p.grad is not None)
    if variant is None:  # as released: nothing attached, nothing added
        assert float(terms["total"]) == 0 and list(kd.student_parameters()) == []
    else:
        for level in TEXTURE_LEVELS:
            assert float(terms[f"cross/{level}"].detach()) > 0
        for level in TEXTURE_LEVELS[:-1]:
            assert float(terms[f"self/{level}"].detach()) > 0
        kernels = [m.f_ker.weight for m in kd.blocks.modules() if isinstance(m, AdaptiveConv)]
        assert len(kernels) == 3  # one block per level (three widths)
        assert all(k.grad is not None and float(k.grad.abs().sum()) > 0 for k in kernels)
    assert any(not torch.equal(before[n], p) for n, p in student.texture.named_parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # frozen
    kd.detach()


def test_nested_levels_run_once_in_order_and_blocks_act_inside():
    """``down_sample.0.2`` lies inside ``down_sample.0``: its hook fires first, once, and its completion block
    changes what the rest of that Sequential reads, in the hole only (Eq. 5)."""
    torch.manual_seed(0)
    student, teacher = StructureFlowTexture(dim=8), StructureFlowTexture(dim=8)
    column = student.texture.conv_column.down_sample
    seen, raw = [], {}
    column[0][2].register_forward_hook(lambda m, i, o: raw.update(level=o))  # before attach: the raw output
    for path in TEXTURE_LEVELS:
        student.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: seen.append(path))
    image, mask = _inputs()
    kd = kdinpaint.attach(student, teacher, "structureflow:hash", example_inputs=(image, mask))
    for m in kd.blocks.modules():
        if isinstance(m, AdaptiveConv):  # a fresh block is the identity (zero kernel predictor); move it
            torch.nn.init.normal_(m.f_ker.weight, std=0.1)
    column[0][3].register_forward_pre_hook(lambda m, i: raw.update(next_input=i[0]))
    seen.clear()
    with torch.no_grad():
        student(image, mask)
    assert seen == TEXTURE_LEVELS
    hole = F.max_pool2d(mask, 2).expand_as(raw["level"]).bool()  # the mask at 1/2
    change = raw["next_input"] - raw["level"]
    assert float(change[~hole].abs().max()) == 0 and float(change[hole].abs().max()) > 0
    kd.detach()


# ---- the teacher: the texture generator fed the ground truth ------------------------------------------------


def _teacher_input(student, teacher, variant, image, mask, **call):
    seen = {}
    kd = kdinpaint.attach(student, teacher, f"structureflow:{variant}", example_inputs=(image, mask))
    teacher.texture.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    student(masked(image, mask), mask, **call)
    kd.losses(target=image)
    kd.detach()
    return seen["x"]


def test_teacher_sees_ground_truth_and_its_structure():
    torch.manual_seed(0)
    image, mask = _inputs()
    x = _teacher_input(StructureFlow(dim=8), StructureFlowTeacher(dim=8), "star", image, mask)
    torch.testing.assert_close(x[:, :3], image)
    torch.testing.assert_close(x[:, 3:6], rtv_structure(image))  # RTV of the ground truth
    assert not x[:, 6:].any()  # empty mask
    given = torch.rand_like(image) * 2 - 1  # a precomputed structure reaches the teacher unchanged
    x = _teacher_input(StructureFlow(dim=8), StructureFlowTeacher(dim=8), "star", image, mask, structure=given)
    torch.testing.assert_close(x[:, 3:6], given)
    # SF#: the same class as the student; its structure slot reads the ground truth itself
    x = _teacher_input(StructureFlowTexture(dim=8), StructureFlowTexture(dim=8), "hash", image, mask)
    torch.testing.assert_close(x[:, :3], image)
    torch.testing.assert_close(x[:, 3:6], image)
    assert not x[:, 6:].any()


def test_teacher_weights_from_student_state_and_official_files(tmp_path):
    sf = randomised(StructureFlow(dim=8), 1)
    teacher = structureflow_teacher(dim=8, structure_from="ground_truth", detach_structure=True)  # student options
    teacher.load_state_dict(sf.state_dict())  # strict; the reconstructor's keys are not the teacher's
    assert _same_texture(teacher, sf)
    for model in (StructureFlowTeacher(dim=8), StructureFlowTexture(dim=8)):
        model.load_state_dict(checkpoint_filter_fn(sf.state_dict(), model))
        assert _same_texture(model, sf)
    with pytest.raises(TypeError):
        structureflow_teacher(dim=8, widht=8)

    torch.save(sf.structure.state_dict(), tmp_path / "latest_net_s_gen.pth")
    torch.save(sf.texture.state_dict(), tmp_path / "latest_net_f_gen.pth")
    assert _same_texture(structureflow_teacher(pretrained=tmp_path, dim=8), sf)  # released f_gen as its start
    from safetensors.torch import load_file

    state = load_file(str(pack_official(tmp_path, tmp_path / "sf.safetensors", dim=8)))
    fresh = structureflow_student(dim=8)
    fresh.load_state_dict(checkpoint_filter_fn(state, fresh))  # what recipes' model.init does
    assert all(torch.equal(v, sf.state_dict()[k]) for k, v in fresh.state_dict().items())


# ---- StructureFlow's own losses --------------------------------------------------------------------------


def _naive_resample(feat: torch.Tensor, flow: torch.Tensor, K: int, sigma: float) -> torch.Tensor:
    """Per-pixel transcription of the official Gaussian sampling (window of K taps, border clamping)."""
    B, C, H, W = feat.shape
    out = torch.zeros(B, C, *flow.shape[-2:], dtype=feat.dtype)
    for b in range(B):
        for y in range(flow.shape[-2]):
            for x in range(flow.shape[-1]):
                sx, sy = x + float(flow[b, 0, y, x]), y + float(flow[b, 1, y, x])
                num, den = torch.zeros(C, dtype=feat.dtype), 0.0
                for ky in range(-(K // 2 - 1), K // 2 + 1):
                    for kx in range(-(K // 2 - 1), K // 2 + 1):
                        px, py = math.floor(sx) + kx, math.floor(sy) + ky
                        w = math.exp(-((px - sx) ** 2 + (py - sy) ** 2) / (2 * sigma**2))
                        num += w * feat[b, :, min(max(py, 0), H - 1), min(max(px, 0), W - 1)]
                        den += w
                out[b, :, y, x] = num / den
    return out


def _naive_correctness(tgt, inp, flow, mask, eps=1e-8):
    B, C, h, w = tgt.shape
    warped = _naive_resample(inp, flow, 4, 2.0)
    hole = mask[:, 0, :: mask.shape[-2] // h, :: mask.shape[-1] // w]  # nearest resize by an integer factor
    total, count = 0.0, 0.0
    for b in range(B):
        vin = [inp[b, :, i // w, i % w] for i in range(h * w)]
        for j in range(h * w):
            v = tgt[b, :, j // w, j % w]
            cos_max = max(float(u @ v) / ((u.norm() + eps) * (v.norm() + eps)) for u in vin)
            s = warped[b, :, j // w, j % w]
            cos = float(s @ v) / float(s.norm() * v.norm())
            total += math.exp(-cos / (cos_max + eps)) * float(hole[b, j // w, j % w])
            count += float(hole[b, j // w, j % w])
    return total / (count + eps)


def test_sampling_correctness_against_naive_recomputation():
    g = torch.Generator().manual_seed(3)
    tgt = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    inp = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    flow = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64) * 1.5
    mask = torch.zeros(2, 1, 8, 10, dtype=torch.float64)
    mask[0, :, 2:6, 0:6] = 1
    mask[1, :, 0:4, 4:10] = 1
    ours = sampling_correctness_loss(tgt, inp, flow, mask)
    assert float(ours) == pytest.approx(_naive_correctness(tgt, inp, flow, mask), rel=1e-10)
    flow.requires_grad_(True)  # the flow learns through the resampler
    assert torch.autograd.gradcheck(lambda f: sampling_correctness_loss(tgt, inp, f, mask), (flow,), eps=1e-6)
    # hand cases: one feature vector everywhere -> cos = cos_max = 1 -> e^-1 on the hole; no hole -> 0
    same = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    assert float(sampling_correctness_loss(same, same, torch.zeros(1, 2, 4, 4), torch.ones(1, 1, 4, 4))) == (
        pytest.approx(math.exp(-1), rel=1e-6)
    )
    assert float(sampling_correctness_loss(tgt, inp, flow.detach(), torch.zeros_like(mask))) == 0


_FAKE_VGG_WEIGHTS = [torch.randn(c, 3, 1, 1, generator=torch.Generator().manual_seed(c)) for c in (4, 5, 6, 7, 8)]


def _fake_vgg(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """VGG19's layer names at VGG19's resolutions (1, 1/2, ..., 1/16), fixed 1x1 convs: a cheap feature map."""
    feats = {}
    for block, weight in enumerate(_FAKE_VGG_WEIGHTS, 1):
        y = torch.relu(F.conv2d(F.avg_pool2d(x, 2 ** (block - 1)), weight.to(x.dtype)))
        for conv in range(1, 5):
            feats[f"relu{block}_{conv}"] = y * conv
    return feats


def _gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    return torch.einsum("bchw,bdhw->bcd", f, f) / (c * h * w)


def test_structureflow_loss_is_the_official_combination():
    g = torch.Generator().manual_seed(5)
    gt = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    pred = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    s, s_target = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    flow = (torch.randn(2, 2, 8, 8, generator=g) * 2).requires_grad_(True)
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:20, 4:24] = 1
    d_out = [torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 2, 2, generator=g)]
    d_s = [torch.randn(2, 1, 4, 4, generator=g)]
    terms = structureflow_loss(pred, gt, mask, structure=s, structure_target=s_target, flow=flow, vgg=_fake_vgg,
                               fake_logits=d_out, structure_fake_logits=d_s)

    fp, fg = _fake_vgg(pred), _fake_vgg(gt)
    fph, fgh = _fake_vgg(pred * mask), _fake_vgg(gt * mask)
    expected = {
        "l1": 5 * (pred - gt).abs().mean(),
        "structure_l1": 4 * (s - s_target).abs().mean(),
        "adv": 1 * sum(((t - 1) ** 2).mean() for t in d_out) / 2,
        "structure_adv": 1 * ((d_s[0] - 1) ** 2).mean(),
        "correctness": 0.25 * sampling_correctness_loss(fg["relu3_1"], _fake_vgg(gt * (1 - mask))["relu3_1"], flow, mask),
        "style": 250 * sum((_gram(fph[k]) - _gram(fgh[k])).abs().mean() for k in SF_STYLE_LAYERS),
        "perceptual": 0.1 * sum((fp[k] - fg[k]).abs().mean() for k in SF_PERCEPTUAL_LAYERS),
    }
    assert set(terms) == {*expected, "total"}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, msg=key)
        assert float(value.detach()) > 0
    torch.testing.assert_close(terms["total"], sum(expected.values()))
    terms["total"].backward()
    assert torch.isfinite(pred.grad).all() and float(flow.grad.abs().sum()) > 0  # the flow learns

    # the forward's StructureFlowOutput supplies structure, its target and the flow; 0 weights skip terms
    out = StructureFlowOutput(pred.detach(), s, s_target, flow.detach())
    fewer = structureflow_loss(out, gt, mask, vgg=_fake_vgg, weights={"style": 0, "perceptual": 0})
    assert set(fewer) == {"l1", "structure_l1", "correctness", "total"}
    torch.testing.assert_close(fewer["correctness"], expected["correctness"].detach())
    assert SF_LOSS_WEIGHTS["correctness"] == 0.25 and SF_LOSS_WEIGHTS["style"] == 250
    with pytest.raises(ValueError, match="unknown StructureFlow loss term"):
        structureflow_loss(pred, gt, mask, weights={"styel": 1.0})
    with pytest.raises(ValueError, match="same shape"):
        structureflow_loss(pred[:, :, :16], gt, mask)


def test_structureflow_vgg_feeds_the_image_unnormalised():
    vgg = StructureFlowVGG(weights=None, allow_random=True)  # random weights: shapes and input range only
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    conv = vgg.features.features[0]
    expected = torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))  # official: [-1, 1] straight in
    torch.testing.assert_close(vgg(x)["relu1_1"], expected)
    assert set(vgg(x)) == {*SF_STYLE_LAYERS, *SF_PERCEPTUAL_LAYERS}
