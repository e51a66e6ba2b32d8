"""Black-box teachers: a TorchScript file, an ONNX file and a plain function as teachers of the toolkit's
conventions, the multi-scale output term, and what is refused (feature terms, wrong shapes and ranges)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from tiny import LEVELS, TinyUNet, batch

import kdinpaint
from kdinpaint.blackbox import BlackBoxConvention, load_blackbox
from kdinpaint.losses.distillation import output_distillation, output_distillation_terms
from kdinpaint.spec import AdapterSpec


class UnitNet(nn.Module):
    """A tiny inpainting network of LaMa's call: image RGB in [0, 1], mask 1 = hole, returns the composite in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, 1, 1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = (mask > 0).to(image.dtype)
        pred = torch.sigmoid(self.conv(torch.cat([image * (1 - mask), mask], 1)))
        return mask * pred + (1 - mask) * image


def unit_net(seed: int = 0) -> UnitNet:
    torch.manual_seed(seed)
    return UnitNet().eval()


def by_hand(net: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The toolkit's view of ``net``: image to [0, 1], call, back to [-1, 1]."""
    with torch.no_grad():
        return net((image + 1) / 2, mask) * 2 - 1


def spec() -> AdapterSpec:
    return AdapterSpec(encoder_levels=LEVELS).for_blackbox()


# ---- the multi-scale output term ----------------------------------------------------------------------------
def naive_output_term(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, scales: int) -> torch.Tensor:
    """Cell by cell: average 2^k x 2^k cells of both predictions, a cell is a hole if any pixel in it is, the mean
    absolute difference over hole cells and channels, summed over k."""
    B, C, H, W = s.shape
    total = torch.zeros((), dtype=torch.float64)
    for k in range(scales):
        f = 2**k
        diff, count = 0.0, 0
        for b in range(B):
            for i in range(H // f):
                for j in range(W // f):
                    cell = (slice(i * f, (i + 1) * f), slice(j * f, (j + 1) * f))
                    if mask[b, 0][cell].max() > 0:
                        for c in range(C):
                            diff += abs(float(s[b, c][cell].double().mean()) - float(t[b, c][cell].double().mean()))
                            count += 1
        total += diff / count if count else 0.0
    return total


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_output_term_against_a_naive_recomputation(size):
    g = torch.Generator().manual_seed(3)
    s, t = torch.rand(2, 3, *size, generator=g) * 2 - 1, torch.rand(2, 3, *size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, *size)
    mask[0, :, 3:9, 2:7] = 1
    mask[1, :, 0:2, 5:12] = 1
    for scales in (1, 4):
        got = output_distillation(s, t, mask, scales)
        torch.testing.assert_close(got.double(), naive_output_term(s, t, mask, scales), rtol=1e-5, atol=1e-6)
    terms = output_distillation_terms(s, t, mask, 4)
    assert len(terms) == 4 and all(x > 0 for x in terms)
    # scales=1 is the plain L1 in the holes per hole pixel and channel
    hole = mask.bool().expand_as(s)
    torch.testing.assert_close(output_distillation(s, t, mask, 1), (s - t).abs()[hole].mean())


def test_output_term_no_hole_is_zero_and_small_images_are_refused():
    s, t = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert output_distillation(s, t, torch.zeros(1, 1, 8, 8), 4).item() == 0.0
    with pytest.raises(ValueError, match="output_scales"):
        output_distillation(s[..., :4, :4], t[..., :4, :4], torch.ones(1, 1, 4, 4), 4)


# ---- the three kinds of black box ---------------------------------------------------------------------------
def _script(net: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is IOPaint's format
        torch.jit.script(net).save(str(path))


def test_torchscript_teacher_is_called_like_iopaint_calls_lama(tmp_path):
    net = unit_net()
    _script(net, tmp_path / "box.pt")
    teacher = load_blackbox(tmp_path / "box.pt", range=[0, 1], channels="rgb", mask="hole_is_1")
    assert list(teacher.parameters()) == [] and teacher.state_dict() == {}
    image, mask = batch()
    out = teacher(image, mask)
    assert out.dtype == torch.float32 and out.shape == image.shape
    torch.testing.assert_close(out, by_hand(net, image, mask), rtol=0, atol=1e-6)
    known = mask.expand_as(image) == 0
    torch.testing.assert_close(out[known], image[known], rtol=0, atol=1e-6)  # the composite keeps the known pixels


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64])  # IOPaint passes LaMa an int64 mask
def test_onnx_teacher_matches_the_network(tmp_path, mask_dtype):
    pytest.importorskip("onnxruntime")
    net = unit_net(1)
    path = tmp_path / "box.onnx"
    example = (torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32, dtype=mask_dtype))
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter: a second per graph (the dynamo one: ten)
        torch.onnx.export(net, example, str(path), input_names=["image", "mask"], output_names=["inpainted"],
                          dynamic_axes=dynamic, dynamo=False)
    teacher = load_blackbox(path)
    assert teacher.fn.inputs[1].type == ("tensor(int64)" if mask_dtype == torch.int64 else "tensor(float)")
    image, mask = batch(size=24)
    torch.testing.assert_close(teacher(image, mask), by_hand(net, image, mask), rtol=0, atol=1e-5)


def test_callable_of_another_convention():
    """BGR in [0, 255], 0 = hole: a function that paints its holes pure blue (BGR 255, 0, 0) and checks what it gets."""
    image, mask = batch()
    seen = {}

    def paint_blue(img: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        seen["image"], seen["mask"] = img, m
        blue = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
        return img * m + blue * (1 - m)

    teacher = load_blackbox(paint_blue, range=[0, 255], channels="bgr", mask="hole_is_0")
    out = teacher(image, mask)
    torch.testing.assert_close(seen["image"], ((image + 1) * 127.5).flip(1))
    torch.testing.assert_close(seen["mask"], 1 - mask)
    hole = mask[:, 0] > 0
    rgb = out.permute(0, 2, 3, 1)[hole]  # (N, 3)
    torch.testing.assert_close(rgb, torch.tensor([-1.0, -1.0, 1.0]).expand_as(rgb))  # blue in RGB, [-1, 1]
    known = ~hole
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[known], image.permute(0, 2, 3, 1)[known], rtol=0, atol=1e-5)


def test_padding_to_a_multiple():
    image, mask = batch(size=20)
    sizes = []

    def needs_8(img, m):
        sizes.append(tuple(img.shape[-2:]))
        assert img.shape[-1] % 8 == 0 and img.shape[-2] % 8 == 0
        return img

    out = load_blackbox(needs_8, multiple=8)(image, mask)
    assert sizes == [(24, 24)] and out.shape == image.shape
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)


def test_convention_parsing():
    assert BlackBoxConvention(range="[-1, 1]").range == (-1.0, 1.0)
    assert BlackBoxConvention.parse({"range": [0, 255], "channels": "bgr"}).range_name == "[0, 255]"
    with pytest.raises(ValueError, match=r"range \[0, 2\] is not one of"):
        BlackBoxConvention(range=[0, 2])
    with pytest.raises(ValueError, match="unknown black-box convention key"):
        BlackBoxConvention.parse({"colour": "rgb"})
    with pytest.raises(ValueError, match="hole_is_1"):
        BlackBoxConvention(mask="white")


# ---- distillation from a black box ---------------------------------------------------------------------------
def test_attach_distils_the_output_at_four_scales(tmp_path):
    net = unit_net()
    _script(net, tmp_path / "box.pt")
    torch.manual_seed(0)
    student = TinyUNet()
    kd = kdinpaint.attach(student, load_blackbox(tmp_path / "box.pt"), spec())
    assert kd.teacher_levels == [] and len(kd.gamma) == 0 and len(kd.align) == 2  # no Eq. 2; Eq. 3 on the student
    image, mask = batch()
    pred = student(image * (1 - mask), mask)
    got = kd.losses(target=image)
    # the teacher saw the student's input (holes zeroed) in its own convention
    want_teacher = by_hand(net, image * (1 - mask), mask)
    want = naive_output_term(pred.detach(), want_teacher, mask, 4)
    torch.testing.assert_close(got["output"].double(), want, rtol=1e-5, atol=1e-6)
    assert {"output/1", "output/2", "output/4", "output/8"} <= set(got)
    torch.testing.assert_close(got["total"], got["self"] + got["output"])
    assert got["cross"].item() == 0.0
    got["total"].backward()
    assert student.head.weight.grad.abs().sum() > 0
    kd.detach()


AS_SHIPPED = AdapterSpec(encoder_levels=LEVELS)  # an adapter's spec: cross-distillation on, teacher fed an empty mask


@pytest.mark.parametrize(
    "data, named",
    [
        ({**AS_SHIPPED.to_dict(), "output_distillation": 1.0, "teacher_input": "student_input"}, "cross_distillation: false"),
        ({**AS_SHIPPED.for_blackbox().to_dict(), "teacher_levels": LEVELS}, "teacher_levels: null"),
        ({**AS_SHIPPED.for_blackbox().to_dict(), "output_distillation": 0.0}, "output_distillation > 0"),
        ({**AS_SHIPPED.for_blackbox().to_dict(), "teacher_input": "empty_mask"}, "teacher_input: student_input"),
    ],
)
def test_feature_terms_are_refused_at_attach_time(data, named):
    with pytest.raises(ValueError, match=f"cannot distil from a black-box teacher.*{named}.*for_blackbox"):
        kdinpaint.attach(TinyUNet(), load_blackbox(unit_net()), AdapterSpec.from_dict(data))


def test_the_spec_as_shipped_names_every_field():
    with pytest.raises(ValueError) as err:
        kdinpaint.attach(TinyUNet(), load_blackbox(unit_net()), AS_SHIPPED)
    for field in ("cross_distillation: false", "output_distillation > 0", "teacher_input: student_input", "for_blackbox()"):
        assert field in str(err.value)


def test_attention_transfer_is_refused():
    from tiny import TinyAttentionUNet

    data = AdapterSpec(encoder_levels=LEVELS, attention_sites=["att"]).for_blackbox().to_dict()
    data["attention_sites"] = [{"module": "att"}]  # transfer on
    with pytest.raises(ValueError, match=r"transfer: false in attention_sites \['att'\]"):
        kdinpaint.attach(TinyAttentionUNet(), load_blackbox(unit_net()), AdapterSpec.from_dict(data))
    # for_blackbox keeps the attention and switches the transfer off
    kd = kdinpaint.attach(TinyAttentionUNet(), load_blackbox(unit_net()), AdapterSpec(encoder_levels=LEVELS, attention_sites=["att"]).for_blackbox())
    assert len(kd.t) == 0
    kd.detach()


def test_a_bare_function_or_script_module_as_teacher_is_refused(tmp_path):
    with pytest.raises(TypeError, match="load_blackbox"):
        kdinpaint.attach(TinyUNet(), lambda image, mask: image, spec())
    _script(unit_net(), tmp_path / "box.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "box.pt"))
    with pytest.raises(TypeError, match="load_blackbox"):
        kdinpaint.attach(TinyUNet(), scripted, spec())


def test_for_trained_teacher_pairs_levels_and_keeps_the_rest():
    shipped = AdapterSpec(encoder_levels=LEVELS, attention_sites=[{"module": "att", "fusion": True}], name="net")
    white = shipped.for_trained_teacher(["a", "b", "c"], {"input": "concat", "output": 0}, 0.5, 2)
    assert white.teacher_levels == ["a", "b", "c"] and white.cross_distillation and white.self_distillation
    assert white.teacher_input == "student_input" and white.teacher_call.input == "concat"
    assert white.output_distillation == 0.5 and white.output_scales == 2
    assert [(a.module, a.transfer, a.fusion) for a in white.attention_sites] == [("att", False, True)]
    black = shipped.for_blackbox()
    assert black.teacher_levels is None and not black.cross_distillation and black.output_scales == 4
    assert AdapterSpec.from_dict(black.to_dict()) == black  # round trip, output_scales included
    with pytest.raises(ValueError, match="3 encoder levels .* but the teacher 2"):
        shipped.for_trained_teacher(["a", "b"])
    with pytest.raises(ValueError, match="output_scales must be >= 1"):
        AdapterSpec(output_scales=0)


# ---- wrong shape or range: refused at the first batch -------------------------------------------------------
def _first_batch(fn, **convention):
    kd = kdinpaint.attach(TinyUNet(), load_blackbox(fn, **convention), spec())  # attach does not call the box
    image, mask = batch()
    kd.student(image * (1 - mask), mask)
    try:
        kd.losses(target=image)
    finally:
        kd.detach()


def test_wrong_shape_is_refused_at_the_first_batch():
    with pytest.raises(ValueError, match=r"returned shape \(2, 32, 32, 3\) for an image \(2, 3, 32, 32\).*channels-last"):
        _first_batch(lambda img, m: img.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"returned shape \(2, 3, 16, 16\)"):
        _first_batch(lambda img, m: img[..., ::2, ::2])
    with pytest.raises(TypeError, match="returned a tuple"):
        _first_batch(lambda img, m: (img, m))


def test_wrong_range_is_refused_at_the_first_batch():
    with pytest.raises(ValueError, match=r"outside its declared range \[0, 1\]; its values fit \[0, 255\]"):
        _first_batch(lambda img, m: img * 255)
    with pytest.raises(ValueError, match=r"declared range \[0, 255\]: it answers like a \[0, 1\] network"):
        _first_batch(lambda img, m: img / 255, range=[0, 255])
    with pytest.warns(UserWarning, match=r"declared range \[-1, 1\].*answers like a \[0, 1\] network"):
        _first_batch(lambda img, m: (img + 1) / 2, range=[-1, 1])
    with pytest.raises(ValueError, match="NaN"):
        _first_batch(lambda img, m: img * float("nan"))


def test_files_that_are_not_black_boxes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no black-box teacher file"):
        load_blackbox(tmp_path / "missing.pt")
    torch.save({"generator.model.1.ffc.convl2l.weight": torch.zeros(1)}, tmp_path / "best.ckpt")
    with pytest.raises(ValueError, match="not a TorchScript file.*teacher.adapter: lama"):
        load_blackbox(tmp_path / "best.ckpt")
    with pytest.raises(ValueError, match="is a folder.*white box"):
        load_blackbox(tmp_path)
