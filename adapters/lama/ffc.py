"""Fast Fourier convolution and LaMa's FFC ResNet generator.

Fast Fourier convolution: Chi, Jiang, Mu, NeurIPS 2020. LaMa: Suvorov et al., "Resolution-robust Large Mask
Inpainting with Fourier Convolutions", WACV 2022 (advimman/lama). An FFC splits its channels into a local
part (ordinary convolutions) and a global part (a pointwise convolution in the frequency domain, whose
receptive field is the whole image); four paths mix them: local->local, local->global and global->local
are ``k x k`` convolutions, global->global is the :class:`SpectralTransform`.

The module tree and parameter names are LaMa's, index for index (``model.<i>.ffc.convl2l.weight``,
``model.<i>.conv1.ffc.convg2g.fu.conv_layer.weight`` ...), so the generator's part of a released
``best.ckpt`` loads with ``strict=True``; the module shapes of each config are pinned by a key fixture.

One deliberate difference in form, none in value: LaMa passes the (local, global) pair between layers as a
Python tuple (with ``0`` for a missing part); here it is one tensor, channels ``[local | global]`` (the order
of LaMa's final concatenation), so every module returns a tensor and any of them can be a feature tap or
a completion site of the toolkit. Activations are not in-place (a tapped feature is not overwritten).
Options of LaMa's code that no released config uses (gated FFCs, squeeze-excitation and spectral positional
encoding in the Fourier unit, 3-D FFT, learnable spatial transforms, groups) are not implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .spectral import DFT_MODES, irdft2, rdft2

__all__ = [
    "FourierUnit",
    "SpectralTransform",
    "FFC",
    "FFCBnAct",
    "FFCResnetBlock",
    "FFCResNetGenerator",
    "CONFIGS",
    "generator_config",
    "set_dft",
]


def _split(x: torch.Tensor, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[local | global]`` channels of ``(B, C, H, W)``."""
    return x[:, :local], x[:, local:]


def _join(x_l: torch.Tensor | None, x_g: torch.Tensor | None) -> torch.Tensor:
    if x_l is None or x_g is None:
        out = x_l if x_g is None else x_g
        assert out is not None  # an FFC has at least one output part
        return out
    return torch.cat([x_l, x_g], dim=1)  # (B, C_l + C_g, H, W)


class FourierUnit(nn.Module):
    """A ``1 x 1`` convolution, batch norm and ReLU applied to the half spectrum of its input.

    ``(B, C_in, H, W)`` -> orthonormal ``rfft2`` -> ``(B, 2 C_in, H, W/2 + 1)`` with each channel's real and
    imaginary parts side by side (channel ``2c`` real, ``2c + 1`` imaginary, LaMa's order) -> conv (no bias),
    BN, ReLU -> the same layout with ``2 C_out`` channels -> ``irfft2`` -> ``(B, C_out, H, W)``.
    ``dft``: ``"fft"`` (torch.fft) or ``"matmul"`` (the same transform as matrix products, :mod:`.spectral`).
    """

    def __init__(self, in_channels: int, out_channels: int, dft: str = "fft") -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(in_channels * 2, out_channels * 2, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels * 2)
        self.relu = nn.ReLU()
        if dft not in DFT_MODES:
            raise ValueError(f"dft must be one of {list(DFT_MODES)}, got {dft!r}")
        self.dft = dft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        re, im = rdft2(x, self.dft)  # (B, C, H, Wf) each
        wf = re.shape[-1]
        z = torch.stack([re, im], dim=2).reshape(B, 2 * C, H, wf).to(x.dtype)  # (B, [c0 re, c0 im, c1 re, ...], H, Wf)
        z = self.relu(self.bn(self.conv_layer(z)))
        z = z.view(B, -1, 2, H, wf)  # (B, C_out, re | im, H, Wf)
        return irdft2(z[:, :, 0], z[:, :, 1], (H, W), self.dft).to(x.dtype)


class SpectralTransform(nn.Module):
    """The global->global path: ``conv2(y + fu(y) [+ lfu(y)])`` with ``y = conv1(avgpool?(x))``.

    ``conv1`` halves the channels (``1 x 1`` conv, BN, ReLU), ``fu`` is a :class:`FourierUnit`, ``conv2`` a
    ``1 x 1`` conv to ``out_channels``. ``stride=2`` average-pools first. ``enable_lfu`` adds LaMa's local
    Fourier unit: a quarter of ``y``'s channels, cut into 2 x 2 spatial tiles stacked along channels, through
    another Fourier unit, tiled back (both tile sides are ``H // 2``, as in LaMa; square maps with even sides).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, enable_lfu: bool = True,
                 dft: str = "fft") -> None:
        super().__init__()
        self.enable_lfu = enable_lfu
        self.downsample = nn.AvgPool2d(kernel_size=(2, 2), stride=2) if stride == 2 else nn.Identity()
        self.stride = stride
        half = out_channels // 2
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, half, kernel_size=1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.fu = FourierUnit(half, half, dft=dft)
        if enable_lfu:
            self.lfu = FourierUnit(half, half, dft=dft)
        self.conv2 = nn.Conv2d(half, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.downsample(x))  # (B, C/2, H, W)
        out = y + self.fu(y)
        if self.enable_lfu:
            c, h = y.shape[1], y.shape[2]
            side = h // 2
            xs = torch.cat(torch.split(y[:, : c // 4], side, dim=-2), dim=1)  # (B, c/4 * 2, H/2, W)
            xs = torch.cat(torch.split(xs, side, dim=-1), dim=1)  # (B, c/4 * 4, H/2, W/2)
            out = out + self.lfu(xs).repeat(1, 1, 2, 2)
        return self.conv2(out)


class FFC(nn.Module):
    """Fast Fourier convolution on ``(B, C_l + C_g, H, W)`` ``[local | global]`` tensors.

    ``C_g = int(in_channels * ratio_gin)`` of the input and ``int(out_channels * ratio_gout)`` of the output are
    global. Paths that would have no input or no output channels are ``nn.Identity`` placeholders (no
    weights), as in LaMa. Output ``(B, out_channels, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = False,
        enable_lfu: bool = True,
        padding_type: str = "reflect",
        dft: str = "fft",
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"an FFC's stride must be 1 or 2, got {stride}")
        for name, ratio in (("ratio_gin", ratio_gin), ("ratio_gout", ratio_gout)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (the global share of the channels), got {ratio!r}")
        self.stride = stride
        self.ratio_gin, self.ratio_gout = ratio_gin, ratio_gout
        in_cg = int(in_channels * ratio_gin)
        out_cg = int(out_channels * ratio_gout)
        self.in_cl, self.in_cg = in_channels - in_cg, in_cg
        self.out_cl, self.out_cg = out_channels - out_cg, out_cg
        self.global_in_num = in_cg

        def conv(cin: int, cout: int) -> nn.Module:
            if cin == 0 or cout == 0:
                return nn.Identity()
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, bias=bias, padding_mode=padding_type)

        self.convl2l = conv(self.in_cl, self.out_cl)
        self.convl2g = conv(self.in_cl, self.out_cg)
        self.convg2l = conv(self.in_cg, self.out_cl)
        self.convg2g = (
            SpectralTransform(in_cg, out_cg, stride, enable_lfu, dft=dft) if in_cg and out_cg else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_l, x_g = _split(x, self.in_cl)
        out_l = out_g = None
        if self.out_cl:
            parts = ([self.convl2l(x_l)] if self.in_cl else []) + ([self.convg2l(x_g)] if self.in_cg else [])
            out_l = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if self.out_cg:
            parts = ([self.convl2g(x_l)] if self.in_cl else []) + ([self.convg2g(x_g)] if self.in_cg else [])
            out_g = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return _join(out_l, out_g)


class FFCBnAct(nn.Module):
    """:class:`FFC`, then batch norm and an activation on each part (``bn_l``/``act_l``, ``bn_g``/``act_g``).

    A part's norm and activation are ``nn.Identity`` when the output has no such part (``ratio_gout`` 0 or 1),
    as in LaMa's ``FFC_BN_ACT``. ``(B, in_channels, H, W)`` -> ``(B, out_channels, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = False,
        activation: bool = True,
        enable_lfu: bool = True,
        padding_type: str = "reflect",
        dft: str = "fft",
    ) -> None:
        super().__init__()
        self.ffc = FFC(in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding, dilation,
                       bias, enable_lfu, padding_type, dft)
        out_cg = int(out_channels * ratio_gout)
        self.bn_l = nn.Identity() if ratio_gout == 1 else nn.BatchNorm2d(out_channels - out_cg)
        self.bn_g = nn.Identity() if ratio_gout == 0 else nn.BatchNorm2d(out_cg)
        self.act_l = nn.ReLU() if activation and ratio_gout != 1 else nn.Identity()
        self.act_g = nn.ReLU() if activation and ratio_gout != 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffc(x)
        local = self.ffc.out_cl
        y_l, y_g = _split(y, local)
        return _join(self.act_l(self.bn_l(y_l)) if local else None, self.act_g(self.bn_g(y_g)) if self.ffc.out_cg else None)


class FFCResnetBlock(nn.Module):
    """``x + conv2(conv1(x))`` with two ``3 x 3`` :class:`FFCBnAct` (ReLU after each, none after the sum).

    ``(B, dim, H, W)`` ``[local | global]`` in and out; the residual adds each part to itself, as LaMa's does.
    """

    def __init__(self, dim: int, ratio_gin: float, ratio_gout: float, dilation: int = 1, enable_lfu: bool = True,
                 padding_type: str = "reflect", dft: str = "fft") -> None:
        super().__init__()
        kw: dict[str, Any] = dict(kernel_size=3, padding=dilation, dilation=dilation, enable_lfu=enable_lfu,
                                  padding_type=padding_type, dft=dft)
        self.conv1 = FFCBnAct(dim, dim, ratio_gin=ratio_gin, ratio_gout=ratio_gout, **kw)
        self.conv2 = FFCBnAct(dim, dim, ratio_gin=ratio_gin, ratio_gout=ratio_gout, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


# ----------------------------------------------------------------------------------------------------------
# The generator and its configs
# ----------------------------------------------------------------------------------------------------------

_CONV_KEYS = ("ratio_gin", "ratio_gout", "enable_lfu")

# LaMa's configs/training: big-lama.yaml's generator section and generator/ffc_resnet_075.yaml (lama-fourier)
CONFIGS: dict[str, dict[str, Any]] = {
    "big-lama": {
        "input_nc": 4,
        "output_nc": 3,
        "ngf": 64,
        "n_downsampling": 3,
        "n_blocks": 18,
        "add_out_act": "sigmoid",
        "init_conv_kwargs": {"ratio_gin": 0, "ratio_gout": 0, "enable_lfu": False},
        "downsample_conv_kwargs": {"ratio_gin": 0, "ratio_gout": 0, "enable_lfu": False},
        "resnet_conv_kwargs": {"ratio_gin": 0.75, "ratio_gout": 0.75, "enable_lfu": False},
    },
}
CONFIGS["lama-fourier"] = {**copy.deepcopy(CONFIGS["big-lama"]), "n_blocks": 9}

_GENERATOR_KEYS = (
    "kind", "input_nc", "output_nc", "ngf", "n_downsampling", "n_blocks", "add_out_act", "max_features",
    "padding_type", "init_conv_kwargs", "downsample_conv_kwargs", "resnet_conv_kwargs",
)


def _resolve(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replace LaMa's OmegaConf references between conv kwargs (``ratio_gin: ${generator.init_conv_kwargs.ratio_gout}``)
    by their values, as OmegaConf would, for a ``config.yaml`` read with plain YAML."""
    for _ in range(8):  # chains are at most a few links long
        changed = False
        for section in cfg.values():
            if not isinstance(section, dict):
                continue
            for key, value in section.items():
                if isinstance(value, str) and value.startswith("${generator.") and value.endswith("}"):
                    path = value[len("${generator.") : -1].split(".")
                    target: Any = cfg
                    for part in path:
                        if not isinstance(target, dict) or part not in target:
                            raise ValueError(f"cannot resolve {value} in the generator config")
                        target = target[part]
                    if not (isinstance(target, str) and target.startswith("${")):
                        section[key], changed = target, True
        if not changed:
            break
    return cfg


def generator_config(config: str | Mapping[str, Any] = "big-lama", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`FFCResNetGenerator` for a named config (:data:`CONFIGS`) or for a LaMa
    ``config.yaml`` read with plain YAML (the whole file or its ``generator:`` section; ``kind`` must be
    ``ffc_resnet``; ``${generator...}`` references are resolved), with
    ``overrides`` on top (e.g. ``ngf=8, n_blocks=2`` for a tiny network; ``global_ratio=0.5`` sets the residual
    blocks' ``ratio_gin`` and ``ratio_gout``). Unknown or unsupported keys are refused by name."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown LaMa config {config!r}; known: {sorted(CONFIGS)} (or pass its generator: mapping)")
        cfg = copy.deepcopy(CONFIGS[config])
    elif isinstance(config, Mapping):
        if isinstance(config.get("generator"), Mapping):  # a whole config.yaml
            config = config["generator"]
        cfg = _resolve(copy.deepcopy(dict(config)))
        kind = cfg.pop("kind", "ffc_resnet")
        if kind != "ffc_resnet":
            raise ValueError(f"only LaMa's ffc_resnet generator is implemented, the config's generator kind is {kind!r}")
    else:
        raise TypeError(f"config must be a config name or a generator mapping, got {type(config).__name__}")
    ratio = overrides.pop("global_ratio", None)
    cfg.update(overrides)
    if ratio is not None:
        cfg["resnet_conv_kwargs"] = {**cfg.get("resnet_conv_kwargs", {}), "ratio_gin": ratio, "ratio_gout": ratio}
    unknown = [k for k in cfg if k not in _GENERATOR_KEYS or k == "kind"]
    if unknown:
        raise ValueError(
            f"unsupported LaMa generator option(s) {unknown}; supported: {[k for k in _GENERATOR_KEYS if k != 'kind']} "
            "and global_ratio (spatial transforms, out_ffc and custom norm/activation layers are not implemented)"
        )
    for key in ("init_conv_kwargs", "downsample_conv_kwargs", "resnet_conv_kwargs"):
        bad = [k for k in cfg.get(key, {}) if k not in _CONV_KEYS]
        if bad:
            raise ValueError(f"unsupported option(s) {bad} in {key}; supported: {list(_CONV_KEYS)}")
    return cfg


class FFCResNetGenerator(nn.Module):
    """LaMa's generator: ``(B, input_nc, H, W)`` -> ``(B, output_nc, H, W)`` (sigmoid: in ``(0, 1)``).

    ``model`` is an ``nn.Sequential`` indexed as LaMa's, for ``n_downsampling = 3``:

    ====================  =========================================================================
    ``model.0``           reflection pad 3
    ``model.1``           ``7 x 7`` :class:`FFCBnAct`, ``input_nc`` -> ``ngf`` (all local), full resolution
    ``model.2`` ... ``4``  ``3 x 3`` stride-2 :class:`FFCBnAct`, doubling the channels; the last one turns
                          ``ratio_gin`` of its output global (the residual blocks' ratio)
    ``model.5`` ...        ``n_blocks`` :class:`FFCResnetBlock` at ``ngf * 2**n_downsampling`` channels, 1/8
    next                  ``nn.Identity`` (LaMa's ConcatTupleLayer: the parts are already one tensor)
    then                  per up-sampling: ``ConvTranspose2d(3, stride 2)``, ``BatchNorm2d``, ``ReLU``
    last                  reflection pad 3, ``7 x 7`` conv to ``output_nc``, the output activation
    ====================  =========================================================================

    Arguments are LaMa's (``configs/training/generator``); conv kwargs take ``ratio_gin``, ``ratio_gout`` and
    ``enable_lfu``. ``dft``: ``"fft"`` or ``"matmul"`` for every Fourier unit (see :func:`set_dft`). ``H`` and
    ``W`` must be multiples of ``2**n_downsampling``.
    """

    def __init__(
        self,
        input_nc: int = 4,
        output_nc: int = 3,
        ngf: int = 64,
        n_downsampling: int = 3,
        n_blocks: int = 18,
        add_out_act: str | bool = "sigmoid",
        init_conv_kwargs: Mapping[str, Any] | None = None,
        downsample_conv_kwargs: Mapping[str, Any] | None = None,
        resnet_conv_kwargs: Mapping[str, Any] | None = None,
        max_features: int = 1024,
        padding_type: str = "reflect",
        dft: str = "fft",
    ) -> None:
        super().__init__()
        for name, value, low in (("input_nc", input_nc, 1), ("output_nc", output_nc, 1), ("ngf", ngf, 1),
                                 ("n_downsampling", n_downsampling, 0), ("n_blocks", n_blocks, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        base = CONFIGS["big-lama"]
        init = {**base["init_conv_kwargs"], **(init_conv_kwargs or {})}
        down = {**base["downsample_conv_kwargs"], **(downsample_conv_kwargs or {})}
        res = {**base["resnet_conv_kwargs"], **(resnet_conv_kwargs or {})}
        self.n_downsampling = n_downsampling
        self.stride = 2**n_downsampling
        width = [min(max_features, ngf * 2**i) for i in range(n_downsampling + 1)]  # channels per resolution

        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            FFCBnAct(input_nc, ngf, kernel_size=7, padding=0, dft=dft, **init),
        ]
        for i in range(n_downsampling):
            kw = dict(down)
            if i == n_downsampling - 1:  # the last one hands the residual blocks their global share
                kw["ratio_gout"] = res.get("ratio_gin", 0)
            layers.append(FFCBnAct(width[i], width[i + 1], kernel_size=3, stride=2, padding=1, dft=dft, **kw))
        layers += [FFCResnetBlock(width[-1], padding_type=padding_type, dft=dft, **res) for _ in range(n_blocks)]
        layers.append(nn.Identity())
        for i in range(n_downsampling, 0, -1):
            cin, cout = min(max_features, ngf * 2**i), min(max_features, int(ngf * 2**i / 2))
            layers += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0)]
        acts = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, True: nn.Tanh}
        if add_out_act:
            if add_out_act not in acts:
                raise ValueError(f"add_out_act must be 'sigmoid', 'tanh', true (tanh) or false, got {add_out_act!r}")
            layers.append(acts[add_out_act]())
        self.model = nn.Sequential(*layers)
        self.n_blocks = n_blocks
        # timm-style description of the encoder (paths relative to this generator)
        self.feature_info = [
            {"module": f"model.{2 + i}", "num_chs": width[i + 1], "reduction": 2 ** (i + 1)} for i in range(n_downsampling)
        ]

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of the three stages for ``x`` as in :meth:`forward`: ``"encoder"`` (after the last
        down-sampling, ``[local | global]`` at 1/``stride``), ``"blocks"`` (after the residual blocks) and
        ``"output"``. For comparisons with LaMa's code stage by stage."""
        first, last = 2 + self.n_downsampling, 2 + self.n_downsampling + self.n_blocks
        encoder = self.model[:first](x)
        blocks = self.model[first:last](encoder)
        return {"encoder": encoder, "blocks": blocks, "output": self.model[last:](blocks)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ValueError(
                f"LaMa's generator needs H and W divisible by {self.stride}, got {tuple(x.shape[-2:])}; pad the input "
                "(kdinpaint_adapters.lama.LaMa pads and crops back itself)"
            )
        return self.model(x)


def set_dft(module: nn.Module, mode: str) -> nn.Module:
    """Switch every :class:`FourierUnit` in ``module`` to ``mode`` (``"fft"`` or ``"matmul"``); returns ``module``.

    The weights and the result (to float rounding) are unchanged: ``"matmul"`` is for exporters and runtimes
    without an FFT operator.
    """
    if mode not in DFT_MODES:
        raise ValueError(f"dft must be one of {list(DFT_MODES)}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, FourierUnit):
            m.dft = mode
    return module
