"""suggest_spec: encoder breakpoints and attention candidates from one traced forward.

References: the hand-written specs (tests/tiny.py LEVELS, the tiny-unet adapter), timm's own
``feature_info`` (the module ending each reduction stage), and networks written here whose level
boundaries follow from their construction.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdinpaint
from kdinpaint.plugins import get_adapter
from kdinpaint.suggest import analyse, example_call, suggest_spec
from tiny import LEVELS, TinyUNet, batch


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class SqueezeExcite(nn.Module):
    """Channel gating through a global 1×1 map (must not be read as a resolution change)."""

    def __init__(self, c: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(self.pool(x)))


class PixelAttention(nn.Module):
    """Self-attention over all positions with the affinity as an nn.Softmax submodule."""

    def __init__(self, c: int):
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)  # (B, N, C)
        k = self.k(x).flatten(2)  # (B, C, N)
        r = self.softmax(q @ k)  # (B, N, N)
        return x + (self.v(x).flatten(2) @ r.transpose(1, 2)).view(b, c, h, w)


class FunctionalAttention(PixelAttention):
    """The same attention with a functional softmax: found, but only reported (nothing to tap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        r = F.softmax(self.q(x).flatten(2).transpose(1, 2) @ self.k(x).flatten(2), dim=-1)  # (B, N, N)
        return x + (self.v(x).flatten(2) @ r.transpose(1, 2)).view(b, c, h, w)


class ChannelGate(nn.Module):
    """A softmax over 6 channels: not over spatial positions, so not an attention candidate."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.softmax(x[:, :6].mean((2, 3), keepdim=True)).mean(1, keepdim=True)


class Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 2, 1), SqueezeExcite(cout), nn.ReLU())


class AttnUNet(nn.Module):
    """Encoder container of three stages (1/2, 1/4, 1/8), decoder with two attentions and a channel gate.

    By construction the level boundaries are ``encoder.0``, ``encoder.1``, ``encoder.2`` (each stage is the
    outermost module producing only maps of its resolution); ``attn`` (at 1/4) holds an nn.Softmax over
    16 × 16 / 16 = 64 positions, ``fattn`` (at 1/2) a functional one.
    """

    def __init__(self, w: int = 8):
        super().__init__()
        self.shared_act = nn.ReLU()  # called several times per forward: never a level
        self.stem = nn.Conv2d(4, w, 3, 1, 1)
        self.encoder = nn.Sequential(Stage(w, w), Stage(w, 2 * w), Stage(2 * w, 4 * w))
        self.up3 = conv(4 * w + 2 * w, 2 * w)
        self.attn = PixelAttention(2 * w)
        self.up2 = conv(2 * w + w, w)
        self.fattn = FunctionalAttention(w)
        self.gate = ChannelGate()
        self.up1 = conv(w + w, w)
        self.head = nn.Conv2d(w, 3, 1)

    def forward(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        x0 = self.shared_act(self.stem(torch.cat([image * (1 - hole), hole], 1)))
        x1 = self.encoder[0](x0)
        x2 = self.encoder[1](x1)
        x3 = self.encoder[2](x2)
        y = self.attn(self.up3(torch.cat([F.interpolate(x3, scale_factor=2.0), x2], 1)))
        y = self.fattn(self.up2(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1)))
        y = self.shared_act(self.gate(y))
        y = self.up1(torch.cat([F.interpolate(y, scale_factor=2.0), x0], 1))
        return torch.tanh(self.head(y))


def test_tiny_unet_matches_the_hand_written_spec():
    image, mask = batch(1, 32)
    result = analyse(TinyUNet(), (image, mask))
    assert result.spec.encoder_levels == LEVELS
    assert result.level_sizes == [(16, 16), (8, 8), (4, 4)]
    assert (result.spec.image_arg, result.spec.mask_arg, result.spec.output) == ("image", "mask", None)
    assert result.spec.probe_shape == [1, 3, 32, 32]
    # min_reduction=1 keeps the full-resolution level too: the last module at 32x32 is the stem
    assert suggest_spec(TinyUNet(), (image, mask), min_reduction=1).encoder_levels == ["stem", *LEVELS]


def test_builtin_adapter_spec_matches_suggestion():
    adapter = get_adapter("tiny-unet")
    image, mask = batch(1, 32)
    assert suggest_spec(adapter.student(), (image, mask)).encoder_levels == adapter.spec.encoder_levels


def test_containers_shared_modules_se_and_attention():
    model = AttnUNet()
    image, hole = batch(2, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = analyse(model, {"image": image, "hole": hole})  # keyword call; the mask found by its 1 channel
    spec = result.spec
    assert spec.encoder_levels == ["encoder.0", "encoder.1", "encoder.2"]
    assert result.level_sizes == [(16, 16), (8, 8), (4, 4)]
    assert (spec.image_arg, spec.mask_arg) == ("image", "hole")
    # the spec names the affinity relative to its attention module
    assert [(s.module, s.affinity, s.layout) for s in spec.attention_sites] == [("attn", "softmax", "queries_keys")]
    found = {(s.module, s.affinity, s.length) for s in result.attention}
    assert found == {("attn", "attn.softmax", 8 * 8), ("fattn", None, 16 * 16)}  # the channel gate is not there
    assert any("'fattn'" in note and "functional softmax" in note for note in result.notes)
    # the trace leaves the model as it was: training flags, weights, no hooks
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # the draft attaches as it is, its attention site included
    kd = kdinpaint.attach(model, kdinpaint.build_teacher(model), spec)
    model(image, hole)
    losses = kd.losses(target=image)
    assert torch.isfinite(losses["total"]) and losses["att/attn"] > 0
    kd.detach()


@pytest.mark.parametrize("name", [
    "reference",
    "gatedconv",  # its contextual attention's softmax is an affinity, not a level; attached as both it failed
    pytest.param("edgeconnect", marks=pytest.mark.slow),
    pytest.param("structureflow", marks=pytest.mark.slow),
])
def test_builtin_adapters_suggestions_attach_and_run_one_loss(name):
    adapter = get_adapter(name)
    student, own = adapter.student(), adapter.spec
    image, mask = batch(1, 64)
    mask_arg = own.mask_arg if own.input == "separate" else None
    example, convention = example_call(student, image, mask, image_arg=own.image_arg, mask_arg=mask_arg, input=own.input)
    spec = analyse(student, example, image_arg=own.image_arg, mask_arg=mask_arg, input=convention).spec
    assert spec.encoder_levels
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), spec, example_inputs=example)
    student(*example)
    losses = kd.losses(target=image)
    kd.detach()
    assert losses["cross"] > 0 and torch.isfinite(losses["total"])


class TwoStage(nn.Module):
    """A coarse 2-level U-Net followed by a 3-level refinement net; returns (coarse, refined)."""

    def __init__(self):
        super().__init__()
        self.coarse = nn.ModuleDict({"d1": conv(4, 8, 2), "d2": conv(8, 8, 2), "u": conv(8, 3)})
        self.refine = nn.ModuleDict({"d1": conv(4, 8, 2), "d2": conv(8, 8, 2), "d3": conv(8, 8, 2), "u": conv(8, 3)})

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.coarse
        coarse = c["u"](F.interpolate(c["d2"](c["d1"](torch.cat([image, mask], 1))), scale_factor=4.0))
        r = self.refine
        y = r["d3"](r["d2"](r["d1"](torch.cat([coarse, mask], 1))))
        return coarse, r["u"](F.interpolate(y, scale_factor=8.0))


def test_multi_stage_picks_the_deeper_stage_and_the_last_output():
    result = analyse(TwoStage(), batch(1, 32))
    assert result.spec.encoder_levels == ["refine.d1", "refine.d2", "refine.d3"]
    assert any("['coarse.d1', 'coarse.d2']" in note for note in result.notes)
    assert result.spec.output == 1


def timm_student(out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)) -> nn.Module:
    class TimmStudent(nn.Module):
        """A timm ResNet-18 encoder (4 input channels: masked image + mask) with a small skip decoder."""

        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=4, out_indices=out_indices)
            ch = self.encoder.feature_info.channels()
            self.dec = nn.ModuleList([nn.Conv2d(ch[i + 1] + ch[i], ch[i], 3, 1, 1) for i in range(len(ch) - 1)])
            self.head = nn.Conv2d(ch[0], 3, 3, 1, 1)

        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            feats = self.encoder(torch.cat([image * (1 - mask), mask], 1))
            y = feats[-1]
            for i in reversed(range(len(feats) - 1)):
                y = self.dec[i](torch.cat([F.interpolate(y, size=feats[i].shape[-2:]), feats[i]], 1))
            return torch.tanh(self.head(F.interpolate(y, size=image.shape[-2:])))

    return TimmStudent()


def test_timm_encoder_levels_match_feature_info():
    student = timm_student()
    result = analyse(student, batch(1, 64))
    info = student.encoder.feature_info
    assert result.spec.encoder_levels == [f"encoder.{name}" for name in info.module_name()]
    assert [64 // h for h, _ in result.level_sizes] == info.reduction()


def test_timm_student_attaches_with_the_suggested_spec():
    student = timm_student(out_indices=(0, 1, 2))
    image, mask = batch(2, 32)
    spec = suggest_spec(student, (image, mask))
    assert spec.encoder_levels == ["encoder.act1", "encoder.layer1", "encoder.layer2"]
    kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), spec)
    pred = student(image, mask)
    losses = kd.losses(target=image)
    assert set(losses) >= {"cross/encoder.layer1", "self/encoder.act1"}
    (pred.abs().mean() + losses["total"]).backward()
    assert student.encoder.conv1.weight.grad.abs().sum() > 0
    kd.detach()


class FusedAttention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return x + F.scaled_dot_product_attention(t, t, t).transpose(1, 2).reshape(x.shape)


def test_fused_attention_is_reported_not_tapped():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = conv(4, 8, 2)
            self.attn = FusedAttention()
            self.up = conv(8, 3)

        def forward(self, image, mask):
            x = self.attn(self.down(torch.cat([image, mask], 1)))
            return self.up(F.interpolate(x, scale_factor=2.0))

    result = analyse(Fused(), batch(1, 16))
    # 8x8 is the deepest resolution: `down` reaches it; the attention after it belongs to the decoder side
    assert result.spec.encoder_levels == ["down"] and result.spec.attention_sites == []
    assert [(s.module, s.length, s.fused) for s in result.attention] == [("attn", 64, True)]
    assert any("scaled_dot_product_attention" in note for note in result.notes)


def test_bad_inputs():
    image, mask = batch(1, 32)
    with pytest.raises(TypeError, match="nn.Module"):
        suggest_spec(lambda x: x, (image, mask))
    with pytest.raises(TypeError, match="tuple of positional"):
        suggest_spec(TinyUNet(), image)
    with pytest.raises(ValueError, match="no \\(B, 1, H, W\\) mask"):
        suggest_spec(TinyUNet(), (image, image))
    with pytest.raises(ValueError, match="min_reduction"):
        suggest_spec(TinyUNet(), (image, mask), min_reduction=0)


def test_reference_network_levels_match_its_hand_written_spec():
    import kdinpaint

    adapter = kdinpaint.get_adapter("reference")
    student = adapter.student(width=4)
    image, mask = torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    assert kdinpaint.suggest_spec(student, (image, mask)).encoder_levels == adapter.spec.encoder_levels
