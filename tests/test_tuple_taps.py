"""Taps on modules returning a tuple: ``block[0]`` as encoder level, completion site, attention site; export."""

import pytest
import torch
import torch.nn.functional as F
from tiny import batch
from torch import nn

import kdinpaint


class AuxBlock(nn.Module):
    """conv + LeakyReLU; with ``aux`` returns ``(features, aux)``, aux the per-channel mean ``(B, C)``."""

    def __init__(self, cin: int, cout: int, stride: int, aux: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.aux = aux

    def forward(self, x):
        y = F.leaky_relu(self.conv(x), 0.2)
        return (y, y.mean((2, 3))) if self.aux else y


class AuxNet(nn.Module):
    """Two encoder levels ``down1``, ``down2``; ``aux=True``: they return ``(features, aux)`` and the decoder is
    gated by aux; ``aux=False``: they return the features alone (the same parameters)."""

    def __init__(self, aux: bool = True, w: int = 8):
        super().__init__()
        self.aux = aux
        self.stem = nn.Conv2d(4, w, 3, 1, 1)
        self.down1 = AuxBlock(w, w, 2, aux)
        self.down2 = AuxBlock(w, 2 * w, 2, aux)
        self.up = nn.Conv2d(2 * w + w, w, 3, 1, 1)
        self.head = nn.Conv2d(w, 3, 3, 1, 1)

    def forward(self, image, mask):
        x0 = self.stem(torch.cat([image * (1 - mask), mask], 1))
        x1 = self.down1(x0)
        x1, a1 = x1 if self.aux else (x1, x1.mean((2, 3)))
        x2 = self.down2(x1)
        x2 = x2[0] if self.aux else x2
        y = F.leaky_relu(self.up(torch.cat([F.interpolate(x2, scale_factor=2.0), x1], 1)), 0.2)
        y = y * torch.sigmoid(a1)[..., None, None]  # (B, w, 1, 1) gate from the level-1 aux output
        return torch.tanh(self.head(F.interpolate(y, scale_factor=2.0)))


def _pair():
    torch.manual_seed(0)
    tupled = AuxNet(aux=True)
    plain = AuxNet(aux=False)
    plain.load_state_dict(tupled.state_dict())
    return tupled, plain


def _randomise_blocks(kd):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in kd.blocks.values():  # fresh blocks are the identity: make them act
            for p in (block.conv.f_ker.weight, block.conv.f_off.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_indexed_levels_give_the_losses_of_the_same_network_returning_features_only():
    tupled, plain = _pair()
    image, mask = batch()
    losses = []
    for model, levels in ((tupled, ["down1[0]", "down2[0]"]), (plain, ["down1", "down2"])):
        torch.manual_seed(2)  # the same meta-networks, alignment convs and completion blocks for both
        kd = kdinpaint.attach(model, kdinpaint.build_teacher(model), {"encoder_levels": levels})
        _randomise_blocks(kd)
        model(image, mask)
        losses.append(kd.losses(target=image))
        kd.detach()
    got, want = losses
    assert set(got) == {k.replace("down1", "down1[0]").replace("down2", "down2[0]") for k in want}
    for key in ("cross", "self", "total"):
        assert want[key] > 0
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    torch.testing.assert_close(got["cross/down2[0]"], want["cross/down2"], rtol=0, atol=0)


def _block_outputs(model, image, mask, block=None):
    seen = {}
    block = model.down1 if block is None else block
    handle = block.register_forward_hook(lambda m, i, o: seen.update(out=o, inp=i[0]))
    try:
        out = model(image, mask)
    finally:
        handle.remove()
    return seen["out"], seen["inp"], out


def test_a_completion_site_on_an_element_replaces_it_and_leaves_the_others_bit_identical(tmp_path):
    tupled, _ = _pair()
    image, mask = batch()
    with torch.no_grad():
        (ref0, ref1), _, _ = _block_outputs(tupled, image, mask)  # the network as it is
    kd = kdinpaint.attach(tupled, None, {"encoder_levels": [], "completion_sites": ["down1[0]"]})
    _randomise_blocks(kd)
    tupled.eval()
    with torch.no_grad():
        (got0, got1), _, attached_out = _block_outputs(tupled, image, mask)  # a hook after attach's: what follows sees
        expected0 = kd.blocks["0"](ref0, mask)  # Eq. 5 on the module's own element 0
    assert torch.equal(got1, ref1)  # the aux element passes untouched
    assert not torch.equal(got0, ref0)
    assert torch.equal(got0, expected0)

    exported = kd.export().eval()
    kd.detach()
    path = tmp_path / "aux.safetensors"
    kdinpaint.save_exported(exported, path)
    reloaded = kdinpaint.load_exported(path, AuxNet(aux=True)).eval()
    assert reloaded.sites == ["down1[0]"]
    with torch.no_grad():
        assert torch.equal(exported(image, mask), attached_out)
        assert torch.equal(reloaded(image, mask), attached_out)
        (e0, e1), _, _ = _block_outputs(reloaded, image, mask, reloaded.model.down1)  # the wrapped site
    assert torch.equal(e0, expected0) and torch.equal(e1, ref1)


def test_a_tuple_without_index_is_refused_listing_its_elements():
    tupled, _ = _pair()
    expected = (r"module 'down1' returns a tuple of 2: \[0\] tensor \(1, 8, 32, 32\), \[1\] tensor \(1, 8\); "
                r"name the element .* by its index, e.g. 'down1\[0\]'")
    with pytest.raises(TypeError, match=expected):
        kdinpaint.attach(tupled, None, {"encoder_levels": ["down1"], "cross_distillation": False})
    with pytest.raises(TypeError, match=r"element \[1\] of student module 'down1' is Tensor of shape \(1, 8\)"):
        kdinpaint.attach(tupled, None, {"encoder_levels": ["down1[1]"], "cross_distillation": False})
    with pytest.raises(IndexError, match=r"'down1\[2\]' names element \[2\].*tuple of 2: \[0\] tensor"):
        kdinpaint.attach(tupled, None, {"encoder_levels": ["down1[2]"], "cross_distillation": False})
    with pytest.raises(TypeError, match=r"'stem\[0\]' names element \[0\], but module 'stem' returns tensor .*'stem'"):
        kdinpaint.attach(tupled, None, {"completion_sites": ["stem[0]"]})
    with pytest.raises(ValueError, match=r"negative element index; count from 0"):
        kdinpaint.AdapterSpec(encoder_levels=["down1[-1]"])
    assert kdinpaint.attach(tupled, None, {"encoder_levels": ["down*[0]"], "cross_distillation": False}).detach() is tupled


# ---- attention returning (output, affinity) ---------------------------------------------------------------
class WeightsAttention(nn.Module):
    """Pixel attention returning ``(output, affinity)`` as ``nn.MultiheadAttention`` does; with ``tupled=False`` the
    output alone, the affinity then being the output of the ``softmax`` submodule."""

    def __init__(self, c: int, tupled: bool):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, 4, 1), nn.Conv2d(c, 4, 1)
        self.softmax = nn.Softmax(-1)
        self.tupled = tupled

    def forward(self, d):
        B, C, H, W = d.shape
        r = self.softmax(self.q(d).flatten(2).transpose(1, 2) @ self.k(d).flatten(2))  # (B, N, N)
        out = (r @ d.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)
        return (out, r) if self.tupled else out


class AttNet(nn.Module):
    def __init__(self, tupled: bool, w: int = 8):
        super().__init__()
        self.tupled = tupled
        self.stem = nn.Conv2d(4, w, 3, 2, 1)
        self.att = WeightsAttention(w, tupled)
        self.head = nn.Conv2d(w, 3, 3, 1, 1)

    def forward(self, image, mask):
        d = self.stem(torch.cat([image * (1 - mask), mask], 1))
        y = self.att(d)
        y = y[0] if self.tupled else y
        return torch.tanh(self.head(F.interpolate(y, scale_factor=2.0)))


def test_attention_elements_fuse_and_transfer_as_the_untupled_attention():
    torch.manual_seed(0)
    tupled, plain = AttNet(True), AttNet(False)
    plain.load_state_dict(tupled.state_dict())
    image, mask = batch(size=16)
    outs, losses = [], []
    for model, site in ((tupled, {"module": "att[0]", "affinity": "[1]"}), (plain, {"module": "att", "affinity": "softmax"})):
        torch.manual_seed(3)
        kd = kdinpaint.attach(model, kdinpaint.build_teacher(model), {"attention_sites": [{**site, "fusion": True}]})
        with torch.no_grad():
            kd.fusion["0"].f_w.weight.normal_(0, 0.3)  # a gate away from 0.5
        outs.append(model(image, mask))
        losses.append(kd.losses(target=image))
        kd.detach()
    assert torch.equal(outs[0], outs[1])  # fusion replaced element 0 as it replaces the plain output
    assert losses[1]["att"] > 0
    torch.testing.assert_close(losses[0]["att"], losses[1]["att"], rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"attention module 'att' returns a tuple of 2: \[0\] tensor \(2, 8, 8, 8\), "
                                         r"\[1\] tensor \(2, 64, 64\); name .* e.g. 'att\[0\]' in attention_sites\[\].module"):
        spec = {"attention_sites": [{"module": "att", "transfer": False, "fusion": True}]}
        kdinpaint.attach(tupled, None, spec, example_inputs=(image, mask))
