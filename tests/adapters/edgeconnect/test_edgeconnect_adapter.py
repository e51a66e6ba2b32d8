"""The ``edgeconnect`` adapter: registration, EC / EC* / EC# attached and trained one step, released weights
through the trainer's ``build_models``, EdgeConnect's own loss against the official formulas."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kdinpaint
from kdinpaint.blocks import AdaptiveConv
from kdinpaint.cli import main
from kdinpaint.train.recipe import load_recipe
from kdinpaint.train.runs import build_models
from kdinpaint_adapters import edgeconnect as ec

ROOT = Path(__file__).resolve().parents[3]
RB = 1  # residual blocks in the tests (8 as released)
LEVELS = ["inpaint.encoder.3", "inpaint.encoder.6", "inpaint.encoder.9"]


def _batch(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 4:20, 6:22] = 1
    mask[1, :, 12:28, 2:14] = 1
    return image, mask


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- registration


def test_registered_with_its_variants_and_loss(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "--json"]) == 0
    entry = next(a for a in json.loads(capsys.readouterr().out)["adapters"] if a["name"] == "edgeconnect")
    assert entry["variants"] == ["hash", "star"] and entry["distribution"] == "kdinpaint"
    adapter = kdinpaint.get_adapter("edgeconnect")
    assert adapter.stride == 4 and adapter.checkpoint_filter_fn is ec.checkpoint_filter_fn
    assert kdinpaint.plugins.get_loss("edgeconnect") is ec.edgeconnect_loss
    released, star, hash_ = (kdinpaint.load_spec(n) for n in ("edgeconnect", "edgeconnect:star", "edgeconnect:hash"))
    assert released.encoder_levels == [] and released.sites == [] and not released.needs_teacher
    assert star.encoder_levels == star.sites == LEVELS  # EC*: CD + SD coupled with CB, like GC* and SF*
    assert hash_.encoder_levels == hash_.sites == LEVELS
    assert isinstance(adapter.student("star", residual_blocks=RB), ec.EdgeConnect)
    assert isinstance(adapter.student("hash", residual_blocks=RB), ec.EdgeConnectInpaint)
    for variant in (None, "star", "hash"):
        assert isinstance(adapter.teacher(variant, residual_blocks=RB), ec.EdgeConnectInpaint)


# ---------------------------------------------------------------- attach + one training step per variant


@pytest.mark.parametrize("variant", [None, "star", "hash"])
def test_each_variant_trains_one_step(variant: str | None) -> None:
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("edgeconnect")
    spec = adapter.spec.variant(variant)
    student, teacher = adapter.student(variant, residual_blocks=RB), adapter.teacher(variant, residual_blocks=RB)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    kd = kdinpaint.attach(student, teacher if spec.needs_teacher or spec.self_distillation else None, spec,
                          allow_empty=variant is None)  # EdgeConnect as released taps nothing
    image, mask = _batch()
    theta = [*student.parameters(), *kd.student_parameters()]
    opt = torch.optim.Adam(theta, lr=1e-3)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    pred = student(image * (1 - mask), mask)
    losses = kd.losses(target=image)
    loss = (pred - image).abs().mean() + 20 * losses["total"]
    loss.backward()
    opt.step()

    assert pred.shape == image.shape and torch.isfinite(loss)
    distilled = variant is not None
    assert (losses["cross"].item() > 0) == distilled and (losses["self"].item() > 0) == distilled
    assert losses["att"].item() == 0
    assert len(kd.blocks) == (3 if variant in ("star", "hash") else 0)
    if variant is not None:  # completion blocks at 64 ch (H), 128 (H/2), 256 (H/4)
        assert sorted(sum(p.numel() for p in b.parameters()) for b in kd.blocks.values()) == sorted(
            _count(AdaptiveConv(c, 3)) for c in (64, 128, 256)
        )
    if distilled:  # the teacher saw the ground truth with an empty mask, once per losses() call
        assert len(seen) == 2  # the attach-time probe, then losses()
        assert torch.equal(seen[-1][0], image) and not seen[-1][1].any()
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert "inpaint.encoder.1.weight" in moved
    assert not any(n.startswith("edge.") for n in moved)  # G1 frozen (edges detached), as in EC's stage 3
    exported = kd.export()
    if variant == "star":  # the completion blocks are all EC* keeps at inference
        blocks = sum(_count(AdaptiveConv(c, 3)) for c in (64, 128, 256))
        assert _count(exported) == _count(student) + blocks
    kd.detach()
    assert not student._forward_hooks and not student._forward_pre_hooks


def test_deployed_sizes() -> None:
    from kdinpaint.inference import deployed_model

    kwargs = {"residual_blocks": RB}
    g1, g2 = _count(ec.EdgeGenerator(RB)), _count(ec.InpaintGenerator(RB))
    released, stride = deployed_model("edgeconnect", kwargs)
    assert _count(released) == g1 + g2 and stride == 4
    star, _ = deployed_model("edgeconnect:star", kwargs)
    assert _count(star) == g1 + g2 + sum(_count(AdaptiveConv(c, 3)) for c in (64, 128, 256))
    hash_, _ = deployed_model("edgeconnect:hash", kwargs)
    assert _count(hash_) == g2 + sum(_count(AdaptiveConv(c, 3)) for c in (64, 128, 256))  # about half of EC


# ---------------------------------------------------------------- released weights through build_models


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, nn.Module]:
    """A checkpoints folder in the official layout (random weights, one residual block)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(3)
    g1, g2 = ec.EdgeGenerator(residual_blocks=RB), ec.InpaintGenerator(residual_blocks=RB)
    g1(torch.rand(1, 3, 16, 16))  # one power iteration: stored u, v are not their initial values
    torch.save({"iteration": 12, "generator": g1.state_dict()}, folder / "EdgeModel_gen.pth")
    torch.save({"iteration": 12, "generator": g2.state_dict()}, folder / "InpaintingModel_gen.pth")
    return folder, g1, g2


@pytest.mark.parametrize(
    "recipe, init",
    [("edgeconnect", "ec.pth"), ("edgeconnect-star", "ec.safetensors"), ("edgeconnect-hash", "InpaintingModel_gen.pth"),
     ("edgeconnect-hash", "ec.safetensors")],
)
def test_build_models_fine_tunes_from_released_weights(official, tmp_path: Path, recipe: str, init: str) -> None:
    folder, g1, g2 = official
    if init.startswith("ec."):
        assert ec.pack_official(folder, tmp_path / init, residual_blocks=RB) == tmp_path / init
        path = tmp_path / init
    else:
        path = folder / init
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml", ["model.kwargs={residual_blocks: 1}", f"model.init={path}"])
    adapter, variant, spec, student, teacher = build_models(r)
    assert adapter.name == "edgeconnect" and spec.name == r.model.adapter
    assert _same(student.inpaint, g2) and _same(teacher.inpaint, g2)  # the teacher starts from G2 too
    if isinstance(student, ec.EdgeConnect):
        assert _same(student.edge, g1)  # spectral-norm u, v included
    else:
        assert variant == "hash" and not hasattr(student, "edge")


def test_hash_takes_a_two_stage_state_dict_and_still_rejects_wrong_keys() -> None:
    both = ec.EdgeConnect(residual_blocks=RB)
    hash_ = ec.EdgeConnectInpaint(residual_blocks=RB)
    hash_.load_state_dict(both.state_dict())  # strict: EC# is EC without its edge stage
    assert _same(hash_.inpaint, both.inpaint)
    bad = {**both.state_dict(), "decoder.9.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="decoder.9.weight"):
        hash_.load_state_dict(bad)
    only_g1 = {k: v for k, v in both.state_dict().items() if k.startswith("edge.")}
    with pytest.raises(RuntimeError, match="Missing key"):
        hash_.load_state_dict(only_g1)
    with pytest.raises(ValueError, match="two stages"):  # EC needs both files
        ec.checkpoint_filter_fn({"generator": ec.InpaintGenerator(RB).state_dict()}, both)


def test_builders_share_recipe_kwargs_and_name_unknown_ones() -> None:
    s = ec.edgeconnect_student(edge_stage=False, residual_blocks=RB, sigma=3.0, merge_edges=False)
    t = ec.edgeconnect_teacher(residual_blocks=RB, sigma=3.0, detach_edges=False)
    assert isinstance(s, ec.EdgeConnectInpaint) and isinstance(t, ec.EdgeConnectInpaint)
    assert ec.edgeconnect_student(residual_blocks=RB, sigma=3.0).sigma == 3.0
    with pytest.raises(TypeError, match="widht"):
        ec.edgeconnect_teacher(widht=8)
    with pytest.raises(TypeError, match="edge_stage"):
        ec.edgeconnect_student(edge_stage="no")


def test_trained_two_stage_model_deep_copies() -> None:
    torch.manual_seed(0)
    model = ec.EdgeConnect(residual_blocks=RB, detach_edges=False).train()
    image, mask = _batch()
    model(image, mask).mean().backward()  # legacy spectral norm caches W with its graph during training
    assert model.edge.encoder[1].weight_orig.grad is not None  # G1 still trains when edges are not detached
    clone = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(image, mask), model(image, mask))


# ---------------------------------------------------------------- EdgeConnect's own loss


def test_loss_matches_the_official_formulas() -> None:
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    _, mask = _batch()
    d = ec.Discriminator(in_channels=3, use_sigmoid=True)  # EC's D as released
    with torch.no_grad():
        for _ in range(10):  # power iterations, so sigma is the spectral norm and the scores are not saturated
            d(torch.rand(1, 3, 32, 32))
    d.eval()  # fixed u, v: every call below sees the same network

    pred01, target01 = (pred + 1) / 2, (target + 1) / 2  # EdgeConnect's range
    l1 = nn.L1Loss()(pred01, target01) / torch.mean(mask)  # InpaintingModel.process
    adv = nn.BCELoss()(d(pred01)[0], torch.ones_like(d(pred01)[0]))  # AdversarialLoss('nsgan'), target "real"
    perc, style = torch.tensor(0.7), torch.tensor(0.003)
    calls = []

    def vgg(p: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append((p, t, m))
        return {"perceptual": perc, "style": style}

    terms = ec.edgeconnect_loss_terms(pred, target, mask, vgg=vgg, discriminator=d)
    torch.testing.assert_close(terms["l1"], l1)
    assert 0.1 < adv.item() < 5  # a score in the BCE's unsaturated range
    torch.testing.assert_close(terms["adversarial"], adv, rtol=1e-5, atol=1e-6)
    assert calls[0][0] is pred and calls[0][1] is target  # VGGStyleLoss takes toolkit images and the mask
    total = ec.edgeconnect_loss(pred, target, mask, vgg=vgg, discriminator=d)
    torch.testing.assert_close(total, l1 + 0.1 * adv + 0.1 * perc + 250 * style, rtol=1e-5, atol=1e-6)
    assert ec.EC_LOSS_WEIGHTS == {"l1": 1.0, "adversarial": 0.1, "perceptual": 0.1, "style": 250.0}
    # terms whose network is absent are left out
    torch.testing.assert_close(ec.edgeconnect_loss(pred, target, mask), l1)


def test_loss_edge_cases() -> None:
    pred, target = torch.zeros(1, 3, 16, 16, requires_grad=True), torch.full((1, 3, 16, 16), 0.5)
    empty = torch.zeros(1, 1, 16, 16)
    loss = ec.edgeconnect_loss(pred, target, empty)  # the official division by mean(M) = 0 would be inf
    torch.testing.assert_close(loss, torch.tensor(0.25))  # plain L1 in [0, 1]: |0.5 - 0.75|
    loss.backward()
    assert torch.isfinite(pred.grad).all()

    class Vgg16Preset:
        preset = type("P", (), {"arch": "vgg16"})()

        def __call__(self, *a: torch.Tensor) -> dict:  # pragma: no cover - refused before the call
            raise AssertionError

    with pytest.raises(ValueError, match="VGG19"):
        ec.edgeconnect_loss(pred, target, empty, vgg=Vgg16Preset())
    with pytest.raises(ValueError, match="shape"):
        ec.edgeconnect_loss(pred, target[..., :8], empty)
    with pytest.raises(ValueError):
        ec.edgeconnect_loss(pred, target, torch.full((1, 1, 16, 16), 255.0))
