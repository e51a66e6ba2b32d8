"""The ``gatedconv`` adapter: GC / GC* / GC† of Table 4, its teacher, its loss and its recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdinpaint
from kdinpaint.cli import main
from kdinpaint.train.recipe import load_recipe
from kdinpaint_adapters.gatedconv import (
    COARSE_LEVELS,
    GatedConvInpaint,
    GatedConvTeacher,
    SNPatchGANDiscriminator,
    checkpoint_filter_fn,
    gatedconv_loss,
)

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
CNUM = 8  # tiny width for the tests (official 48)


def _batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 16:40, 8:32] = 1  # a different hole per sample
    mask[1, :, 30:60, 28:52] = 1
    return image, mask


def _keep(store: dict, key: str, take_input: bool = False, detach: bool = False):
    """A forward hook recording the first output (or first input) under ``key``; returns None (output unchanged)."""

    def hook(module, inputs, output) -> None:
        value = inputs[0] if take_input else output
        store.setdefault(key, value.detach() if detach else value)

    return hook


def _variant_models(variant: str | None):
    adapter = kdinpaint.get_adapter("gatedconv")
    spec = adapter.spec.variant(variant)
    torch.manual_seed(0)
    student, teacher = adapter.student(variant, cnum=CNUM), adapter.teacher(variant, cnum=CNUM)
    return spec, student, teacher


# ------------------------------------------------------------------ registry and spec


def test_listed_with_variants(capsys):
    assert main(["adapters", "--json"]) == 0
    entry = next(a for a in json.loads(capsys.readouterr().out)["adapters"] if a["name"] == "gatedconv")
    assert entry["variants"] == ["dagger", "star"] and entry["distribution"] == "kdinpaint"
    adapter = kdinpaint.get_adapter("gatedconv")
    assert adapter.stride == 8 and adapter.checkpoint_filter_fn is checkpoint_filter_fn
    assert kdinpaint.plugins.get_loss("gatedconv") is gatedconv_loss


def test_coarse_encoder_levels_are_the_three_resolutions():
    spec = kdinpaint.load_spec("gatedconv:star")
    assert spec.encoder_levels == spec.sites == COARSE_LEVELS and spec.attention_sites == []
    model = GatedConvInpaint(cnum=CNUM)
    shapes = {}
    for path in COARSE_LEVELS:
        model.get_submodule(path).register_forward_hook(_keep(shapes, path))
    image, mask = _batch(64)
    with torch.no_grad():
        model(image, mask)
    # (B, cnum/2, H, W), (B, cnum, H/2, W/2), (B, 2 cnum, H/4, W/4): the coarse network's encoder
    assert {p: tuple(v.shape) for p, v in shapes.items()} == {"conv1": (2, 4, 64, 64), "conv3": (2, 8, 32, 32), "conv6": (2, 16, 16, 16)}
    base, dagger = kdinpaint.load_spec("gatedconv"), kdinpaint.load_spec("gatedconv:dagger")
    assert base.encoder_levels == base.sites == [] and base.attention_sites == [] and not base.needs_teacher
    (site,) = dagger.attention_sites
    assert (site.module, site.affinity, site.layout, site.transfer, site.fusion) == (
        "contextual_attention", "affinity", "keys_hw", True, False
    )
    assert dagger.encoder_levels == [] and dagger.teacher_input == "same_mask"


def test_deployed_parameters_per_variant():
    from kdinpaint.inference import deployed_model

    counts = {}
    for name in ("gatedconv", "gatedconv:star", "gatedconv:dagger"):
        model, stride = deployed_model(name, {"cnum": CNUM})
        counts[name] = sum(p.numel() for p in model.parameters())
        assert stride == 8
    assert counts["gatedconv"] == sum(p.numel() for p in GatedConvInpaint(cnum=CNUM).parameters())
    assert counts["gatedconv:dagger"] == counts["gatedconv"]  # attention transfer is training-only
    # GC* keeps one completion block per coarse level (widths cnum/2, cnum, 2 cnum): a 3x3 predictor of
    # 9 kernel weights and one of 18 offsets, i.e. (9 + 18) * (9 C + 1) parameters each.
    assert counts["gatedconv:star"] - counts["gatedconv"] == sum(27 * (9 * c + 1) for c in (4, 8, 16))


# ------------------------------------------------------------------ teacher


def test_teacher_reconstructs_the_ground_truth_with_the_students_patch_validity():
    torch.manual_seed(0)
    student = GatedConvInpaint(cnum=CNUM).eval()
    teacher = GatedConvTeacher(cnum=CNUM).eval()
    teacher.load_state_dict(checkpoint_filter_fn({"G": student.state_dict()}), strict=True)  # model.init path
    image, mask = _batch(64)
    changed = image.clone()
    changed[mask.expand_as(image) > 0] = -image[mask.expand_as(image) > 0]  # new content in the holes only
    atts = []
    for net in (student, teacher):
        net.contextual_attention.affinity.register_forward_hook(lambda m, i, o: atts.append(o))
    with torch.no_grad():
        s0, s1 = student(image, mask), student(changed, mask)
        t0, t1 = teacher(image, mask), teacher(changed, mask)
        teacher(image, torch.zeros_like(mask))
    assert torch.equal(s0, s1)  # the student never sees the holes
    # The teacher sees the whole ground truth (relative: a freshly initialised DeepFill v2 outputs ~1e-15,
    # the gated activations shrink the signal layer after layer, as with the official TF initialisation).
    assert (t0 - t1).abs().amax() > 1e-2 * t0.abs().amax() > 0
    # Same background patches usable for student and teacher: the keys that are zero for every query.
    unusable = [(a == 0).flatten(2).all(-1) for a in atts]
    assert atts[0].shape == atts[2].shape and unusable[0].any()
    assert torch.equal(unusable[0], unusable[2]) and torch.equal(unusable[0], unusable[3])
    assert not unusable[4].any()  # an empty mask (teacher pre-training): every patch usable


def test_teacher_l1_trains_both_stages():
    """An L1 autoencoder loss on the teacher's output reaches the coarse encoder that GC* distils from
    (a plain generator with an empty hole would leave the coarse network without gradient)."""
    torch.manual_seed(0)
    image, mask = _batch(32)
    empty = torch.zeros_like(mask)
    teacher, plain = GatedConvTeacher(cnum=CNUM), GatedConvInpaint(cnum=CNUM)
    for net in (teacher, plain):
        (net(image, empty) - image).abs().mean().backward()
    for path in COARSE_LEVELS:
        assert teacher.get_submodule(path).conv.weight.grad.abs().sum() > 0, path
        assert plain.get_submodule(path).conv.weight.grad.abs().sum() == 0, path
    with pytest.raises(ValueError, match="mask"):
        teacher(image, torch.zeros(2, 1, 16, 16))


# ------------------------------------------------------------------ one training step per variant


@pytest.mark.parametrize("variant", [None, "star", "dagger"])
def test_each_variant_trains_one_step(variant):
    spec, student, teacher = _variant_models(variant)
    needs_teacher = spec.needs_teacher or (spec.self_distillation and bool(spec.encoder_levels))
    kd = kdinpaint.attach(student, teacher if needs_teacher else None, spec, allow_empty=variant is None)  # GC as released
    image, mask = _batch(64)
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=1e-3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    pred = student(image * (1 - mask), mask)
    losses = kd.losses(target=image)
    loss = (pred - image).abs().mean() + 20 * losses["total"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in losses.values())
    expect = {None: (False, False, False, 0), "star": (True, True, False, 3), "dagger": (False, False, True, 0)}[variant]
    assert tuple(losses[k].item() > 0 for k in ("cross", "self", "att")) + (len(kd.blocks),) == expect
    if variant == "star":
        assert sorted(k for k in losses if "/" in k) == ["cross/conv1", "cross/conv3", "cross/conv6", "self/conv1", "self/conv3"]
    assert student.conv1.conv.weight.grad.abs().sum() > 0  # the coarse stage gets the gradient of the holes
    assert not torch.equal(before["allconv17.conv.weight"], student.allconv17.conv.weight)
    assert all(not p.requires_grad for p in teacher.parameters()) == needs_teacher
    kd.detach()
    assert all(p.requires_grad for p in teacher.parameters())


def test_attention_transfer_equals_a_per_query_loop():
    """GC†'s R_att (Eq. 9) recomputed from the captured affinities (B x keys x h x w) query by query."""
    spec, student, teacher = _variant_models("dagger")
    kd = kdinpaint.attach(student, teacher, spec)
    image, mask = _batch(64)
    got = {}
    student.contextual_attention.affinity.register_forward_hook(_keep(got, "s", detach=True))
    teacher.contextual_attention.affinity.register_forward_hook(_keep(got, "t"))
    teacher.contextual_attention.register_forward_hook(_keep(got, "d", take_input=True))
    pred = student(image * (1 - mask), mask)
    att = kd.losses(target=image)["att"]
    r, r_t = got["s"].double(), got["t"].double()
    B, L, h, w = r.shape
    assert (B, L, h, w) == (2, 64, 8, 8)  # keys = (64/8)^2 background patches, queries on the H/8 grid
    with torch.no_grad():
        t = F.interpolate(kd.t["0"](got["d"]), size=(h, w), mode="bilinear", align_corners=False).double()
    holes = F.adaptive_max_pool2d(mask, (h, w)) > 0  # a query is a hole if any pixel under it is
    total, count = 0.0, 0
    for b in range(B):
        for y in range(h):
            for x in range(w):
                if holes[b, 0, y, x]:
                    total += float(t[b, 0, y, x] * ((r_t[b, :, y, x] - r[b, :, y, x]) ** 2).sum())
                    count += 1
    assert count > 0 and att.item() > 0
    assert att.item() == pytest.approx(total / count, rel=1e-5)
    (pred.abs().mean() + att).backward()
    assert student.pmconv6.conv.weight.grad.abs().sum() > 0  # the transfer reaches the attention branch
    kd.detach()


# ------------------------------------------------------------------ loss


def test_gatedconv_loss_matches_the_official_terms():
    torch.manual_seed(0)
    image, mask = _batch(64)
    pred = (torch.rand_like(image) * 2 - 1).requires_grad_()
    coarse = torch.rand_like(image) * 2 - 1
    disc = SNPatchGANDiscriminator(cnum=4).eval()  # eval: the power iteration's u stays put
    l1 = (image - pred).abs().sum() / image.numel() + (image - coarse).abs().sum() / image.numel()
    fake = torch.where(mask.bool().expand_as(image), pred, image)
    expected = l1 - disc(fake, mask).sum() / (2 * disc(fake, mask).shape[1])
    loss = gatedconv_loss(pred, image, mask, coarse=coarse, discriminator=disc)
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert gatedconv_loss(pred, image, mask).item() == pytest.approx(((image - pred).abs().mean()).item(), rel=1e-6)
    # The adversarial term sees the composite: its gradient reaches the hole pixels only.
    grad = torch.autograd.grad(loss - gatedconv_loss(pred, image, mask, coarse=coarse), pred)[0]
    known = (1 - mask).expand_as(image).bool()
    assert grad[known].abs().max() == 0 and grad[~known].abs().max() > 0
    with pytest.raises(ValueError, match="same shape|one shape"):
        gatedconv_loss(pred, image[:, :, :32], mask)
    with pytest.raises(ValueError, match="coarse"):
        gatedconv_loss(pred, image, mask, coarse=coarse[:1])


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize(("name", "adapter"), [("gatedconv", "gatedconv"), ("gatedconv-star", "gatedconv:star"),
                                                ("gatedconv-dagger", "gatedconv:dagger")])
def test_recipes_name_the_variant_and_deepfill_settings(name, adapter):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.model.adapter == adapter and recipe.model.init  # fine-tuned from the converted weights
    assert recipe.losses.gan_loss == "hinge" and recipe.losses.lambda_s == 0 and recipe.optim.betas == [0.5, 0.999]
    kdinpaint.load_spec(adapter)
