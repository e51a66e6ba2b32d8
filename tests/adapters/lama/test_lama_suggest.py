"""``kdinpaint spec suggest`` on LaMa proposes only layers attach accepts: the tiny student as this adapter builds it
(each FFC layer returns one ``[local | global]`` tensor, and its Fourier units convolve half spectra of
``W // 2 + 1`` columns, which are no resolution), and the same network passing ``(local, global)`` tuples between
its FFC layers as LaMa's own code does (``0`` for a missing part)."""

from __future__ import annotations

import torch
from torch import nn

import kdinpaint
from kdinpaint.suggest import analyse, example_call
from kdinpaint_adapters.lama import ENCODER_LEVELS, LaMa
from tiny import batch


class TupleFFC(nn.Module):
    """An FFC layer returning ``(local, global)`` as LaMa's ``FFC_BN_ACT`` does: ``0`` for a missing global part."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        if isinstance(x, tuple):  # (local, global) of the layer before
            x = torch.cat([p for p in x if isinstance(p, torch.Tensor)], 1)
        y = self.layer(x)
        local = self.layer.ffc.out_cl
        return y[:, :local], (y[:, local:] if self.layer.ffc.out_cg else 0)


class Joined(nn.Module):
    """The first residual block, fed the joined ``[local | global]`` tensor (LaMa's blocks split it themselves)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(torch.cat(x, 1))


def tuple_lama() -> LaMa:
    model = LaMa("lama-fourier", ngf=8, n_blocks=1)
    layers = model.generator.model
    for i in range(1, 5):  # the stem and the three down-samplings
        layers[i] = TupleFFC(layers[i])
    layers[5] = Joined(layers[5])
    return model


def _suggest_attach_and_run(model: nn.Module):
    image, mask = batch(2, 32)
    example, convention = example_call(model, image, mask)
    result = analyse(model, example)
    spec = result.spec
    assert spec.input == "concat"
    kd = kdinpaint.attach(model, kdinpaint.build_teacher(model), spec)
    model(*example)
    losses = kd.losses(target=image)
    kd.detach()
    assert set(losses) >= {f"cross/{p}" for p in spec.encoder_levels}
    assert losses["cross"] > 0 and losses["self"] > 0 and torch.isfinite(losses["total"])
    return result


def test_the_lama_student_gets_its_hand_written_levels_and_they_attach():
    torch.manual_seed(0)
    result = _suggest_attach_and_run(LaMa("lama-fourier", ngf=8, n_blocks=2))
    # the spectra of the residual blocks' Fourier units ((4, 3) at 1/8 of 32) are not taken for a deeper level
    assert result.spec.encoder_levels == ENCODER_LEVELS
    assert result.level_sizes == [(16, 16), (8, 8), (4, 4)]


def test_tuple_returning_ffc_layers_are_proposed_by_the_index_of_a_feature_map():
    torch.manual_seed(0)
    result = _suggest_attach_and_run(tuple_lama())
    assert result.spec.encoder_levels == [f"{p}[0]" for p in ENCODER_LEVELS]  # the local part of each layer
    notes = " ".join(result.notes)
    assert "'generator.model.2' returns a tuple ([0] tensor (2, 16, 16, 16), [1] int); element [0] is tapped" in notes
    # the last down-sampling has a global part too: the note names it
    assert "element(s) [1] are feature maps too: name another with generator.model.4[N]" in notes
