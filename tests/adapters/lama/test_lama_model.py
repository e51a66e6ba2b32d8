"""The lama adapter against LaMa's official generator, without its code: the fixtures beside this file hold the
official state_dict keys and shapes of big-lama, lama-fourier and a tiny config (lama_keys.json), and the
official generator's stage outputs for the tiny config with weights from :func:`seeded` at two image sizes
(lama_reference.safetensors). Both were written by LaMa's own ``saicinpainting/training/modules/ffc.py``."""

from __future__ import annotations

import copy
import json
import pickle
import sys
import types
import typing
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdinpaint
from kdinpaint_adapters.lama import (
    FFCResNetGenerator,
    LaMa,
    generator_config,
    infer_config,
    load_official,
    read_checkpoint,
    save_official,
)
from kdinpaint_adapters.lama.spectral import irdft2, rdft2

HERE = Path(__file__).parent
FIXTURE = json.loads((HERE / "lama_keys.json").read_text())
TINY = FIXTURE["configs"]["tiny"]


def seeded(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Weights that depend only on the key and shape (the fixture's reference outputs were made with these)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if name.endswith(("running_mean", "bias")):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:  # batch-norm weight; a residual branch's last norm small, as in a trained ResNet
        return (0.2 if ".conv2.bn_" in name else 1.0) * (1 + 0.1 * torch.randn(shape, generator=g))
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=g) / fan_in**0.5


def official_state(config: str = "tiny") -> dict[str, torch.Tensor]:
    return {k: seeded(k, tuple(s)) for k, s in FIXTURE["keys"][config].items()}


def write_lightning(path: Path, generator: dict[str, torch.Tensor], **extra: object) -> Path:
    """A checkpoint in LaMa's Lightning layout: generator, discriminator and loss entries side by side."""
    state = {f"generator.{k}": v for k, v in generator.items()}
    state["discriminator.model0.0.weight"] = torch.randn(64, 3, 4, 4)
    state["discriminator.model0.0.bias"] = torch.zeros(64)
    state["loss_resnet_pl.impl.conv1.weight"] = torch.randn(64, 3, 3, 3)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.2.9", **extra}, path)
    return path


@pytest.mark.parametrize("config", ["big-lama", "lama-fourier", "tiny"])
def test_state_dict_keys_and_shapes_are_the_official_ones(config):
    with torch.device("meta"):
        model = FFCResNetGenerator(**FIXTURE["configs"][config])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == FIXTURE["keys"][config]
    if config != "tiny":  # the named configs are the official YAML sections
        assert generator_config(config) == FIXTURE["configs"][config]


CONFIG_YAML = """
generator:            # as in a LaMa run's config.yaml, the conv kwargs chained by OmegaConf references
  kind: ffc_resnet
  input_nc: 4
  output_nc: 3
  ngf: 64
  n_downsampling: 3
  n_blocks: 18
  add_out_act: sigmoid
  init_conv_kwargs: {ratio_gin: 0, ratio_gout: 0, enable_lfu: false}
  downsample_conv_kwargs:
    ratio_gin: ${generator.init_conv_kwargs.ratio_gout}
    ratio_gout: ${generator.downsample_conv_kwargs.ratio_gin}
    enable_lfu: false
  resnet_conv_kwargs:
    ratio_gin: 0.75
    ratio_gout: ${generator.resnet_conv_kwargs.ratio_gin}
    enable_lfu: false
"""


def test_config_yaml_of_a_lama_run():
    import yaml

    data = yaml.safe_load(CONFIG_YAML)
    assert generator_config(data) == generator_config(data["generator"]) == FIXTURE["configs"]["big-lama"]
    data["generator"]["n_blocks"] = 9
    assert generator_config(data) == FIXTURE["configs"]["lama-fourier"]
    data["generator"]["kind"] = "pix2pixhd_global"
    with pytest.raises(ValueError, match="only LaMa's ffc_resnet generator"):
        generator_config(data)


@pytest.mark.parametrize("config, count", [("big-lama", 50_975_875), ("lama-fourier", 27_048_835)])
def test_parameter_counts(config, count):
    """The LaMa paper's 51 M (Big LaMa) and 27 M (LaMa-Fourier); the same sums over the fixture's shapes."""
    with torch.device("meta"):
        model = LaMa(config)
    assert sum(p.numel() for p in model.parameters()) == count
    keys = FIXTURE["keys"][config]
    assert sum(torch.Size(s).numel() for k, s in keys.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == count


@pytest.mark.parametrize("size", ["32x32", "24x40"])
def test_outputs_match_the_official_generator_per_stage(size):
    ref = load_file(str(HERE / "lama_reference.safetensors"))
    model = FFCResNetGenerator(**TINY).eval()
    model.load_state_dict(official_state(), strict=True)
    image, mask = ref[f"{size}/image"], ref[f"{size}/mask"]
    with torch.no_grad():
        stages = model.stages(torch.cat([image * (1 - mask), mask], 1))
        toolkit = LaMa(TINY).eval()
        toolkit.generator.load_state_dict(official_state())
        # the toolkit call: image in [-1, 1], anything under the holes; prediction in [-1, 1]
        scribbled = torch.where(mask.bool(), torch.rand_like(image), image) * 2 - 1
        pred = toolkit(torch.cat([scribbled, mask], 1))
    for stage in ("encoder", "blocks", "output"):
        assert stages[stage].shape == ref[f"{size}/{stage}"].shape
        assert (stages[stage] - ref[f"{size}/{stage}"]).abs().max() < 1e-5, stage
    assert ((pred + 1) / 2 - ref[f"{size}/output"]).abs().max() < 1e-5


def test_load_official_lightning_layout_strict(tmp_path, caplog):
    ckpt = write_lightning(tmp_path / "best.ckpt", official_state())
    inferred = load_official(ckpt)  # the config from the weights
    assert inferred.config["n_blocks"] == 2 and inferred.config["ngf"] == 8
    assert inferred.config["resnet_conv_kwargs"] == {"ratio_gin": 0.75, "ratio_gout": 0.75, "enable_lfu": False}
    given = load_official(ckpt, config=TINY)
    into = load_official(ckpt, model=LaMa(TINY))
    for model in (inferred, given, into):
        state = model.generator.state_dict()
        assert all(torch.equal(state[k], v) for k, v in official_state().items())
    # the student builder and the adapter's filter take the same file
    student = kdinpaint.get_adapter("lama").student(**{k: v for k, v in TINY.items() if k in ("ngf", "n_blocks")},
                                                    pretrained=str(ckpt))
    assert torch.equal(student.generator.model[1].ffc.convl2l.weight, official_state()["model.1.ffc.convl2l.weight"])
    # and what save_official writes is the same layout again
    again = load_official(save_official(student, tmp_path / "again.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))


@pytest.mark.parametrize(
    "other, named",
    [
        ({"n_blocks": 3}, r"unexpected keys \(\d+\): model\.7\.conv1"),  # one more residual block
        ({"resnet_conv_kwargs": {"ratio_gin": 0.5, "ratio_gout": 0.5}}, r"shape mismatches .*model\.4\.ffc\.convl2l\.weight"),
    ],
)
def test_checkpoint_of_another_config_is_refused_naming_keys(tmp_path, other, named):
    cfg = copy.deepcopy(TINY)
    cfg.update(other)
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in FFCResNetGenerator(**cfg).state_dict().items()}
    ckpt = write_lightning(tmp_path / "other.ckpt", {k: seeded(k, s) for k, s in keys.items()})
    with pytest.raises(ValueError, match=named) as err:
        load_official(ckpt, model=LaMa(TINY))
    assert "the file's generator looks like" in str(err.value)
    assert isinstance(load_official(ckpt), LaMa)  # built with the file's own config, it loads


def test_load_official_from_a_model_folder(tmp_path):
    """big-lama/ as released: config.yaml beside models/best.ckpt; the config comes from the YAML."""
    (tmp_path / "models").mkdir()
    write_lightning(tmp_path / "models" / "best.ckpt", official_state())
    (tmp_path / "config.yaml").write_text(CONFIG_YAML.replace("ngf: 64", "ngf: 8").replace("n_blocks: 18", "n_blocks: 2"))
    model = load_official(tmp_path)
    assert model.config == TINY
    assert torch.equal(model.generator.model[1].ffc.convl2l.weight, official_state()["model.1.ffc.convl2l.weight"])


def test_other_layouts_of_the_same_weights(tmp_path):
    """A bare generator state_dict, a safetensors file of LaMa.state_dict(), and a recipe's model.init route."""
    from safetensors.torch import save_file

    from kdinpaint.weights import load_weights

    want = official_state()
    torch.save(want, tmp_path / "generator.pth")
    model = LaMa(TINY)
    save_file({f"generator.{k}": v for k, v in want.items()}, str(tmp_path / "lama.safetensors"))
    write_lightning(tmp_path / "plain.ckpt", want)  # tensors and plain values only: weights_only=True reads it
    for name in ("generator.pth", "lama.safetensors", "plain.ckpt"):
        loaded = load_official(tmp_path / name)
        assert all(torch.equal(loaded.generator.state_dict()[k], v) for k, v in want.items()), name
    load_weights(model, tmp_path / "plain.ckpt", "LaMa (model.init)", kdinpaint.get_adapter("lama").checkpoint_filter_fn)
    assert torch.equal(model.generator.model[1].ffc.convl2l.weight, want["model.1.ffc.convl2l.weight"])


def test_not_a_lama_checkpoint(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="no LaMa generator weights"):
        load_official(path)
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "missing.ckpt")


def _fake_class(module: str, name: str, base: type = object, **attrs: object) -> type:
    cls = type(name, (base,), dict(attrs))
    cls.__module__, cls.__qualname__ = module, name
    return cls


def test_lightning_metadata_is_read_without_running_it(tmp_path, monkeypatch):
    """What a Lightning best.ckpt pickles beside its tensors (an OmegaConf config, callbacks keyed by class, an
    AttributeDict) loads as inert placeholders; the classes are never imported or called."""
    calls = []
    DictConfig = _fake_class("omegaconf.dictconfig", "DictConfig",
                             __getstate__=lambda self: {"_content": {"ngf": 8}, "_metadata": typing.Any},
                             __setstate__=lambda self, state: calls.append(state))
    ModelCheckpoint = _fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    AttributeDict = _fake_class("pytorch_lightning.utilities.parsing", "AttributeDict", dict)
    for cls in (DictConfig, ModelCheckpoint, AttributeDict):  # pickle imports each class's module while saving
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        setattr(sys.modules[cls.__module__], cls.__name__, cls)
    hparams = AttributeDict(config=DictConfig())
    ckpt = write_lightning(tmp_path / "best.ckpt", official_state(), hyper_parameters=hparams,
                           callbacks={ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}})
    monkeypatch.undo()  # the stand-in modules are gone: loading must not need them
    with pytest.raises(pickle.UnpicklingError):  # plain weights-only loading refuses the file
        torch.load(ckpt, weights_only=True)

    data = read_checkpoint(ckpt)
    assert type(data["hyper_parameters"]) is dict and "config" in data["hyper_parameters"]
    assert type(data["hyper_parameters"]["config"]).__name__ == "_Inert"
    assert calls == []  # the stored class's __setstate__ never ran
    model = load_official(ckpt)
    assert torch.equal(model.generator.model[1].ffc.convl2l.weight, official_state()["model.1.ffc.convl2l.weight"])


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_code_named_by_a_checkpoint_never_runs(tmp_path):
    """A call inside the metadata namespaces becomes a placeholder; one outside them refuses the file, named."""
    import numpy as np

    marker = tmp_path / "ran.npy"
    ckpt = write_lightning(tmp_path / "a.ckpt", official_state(), hyper_parameters=_Call(np.save, str(marker), np.zeros(1)))
    assert type(read_checkpoint(ckpt)["hyper_parameters"]).__name__ == "_Inert"  # numpy.save stood in for, not called
    for payload, named in ((_Call(exec, f"open({str(marker)!r}, 'w')"), "builtins.exec"),
                           (_Call(Path.touch, marker), "builtins.getattr")):  # a method is reached through getattr
        ckpt = write_lightning(tmp_path / "b.ckpt", official_state(), hyper_parameters=payload)
        with pytest.raises(ValueError, match=rf"other than tensors and Lightning metadata: .*'{named}'"):
            read_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("config", ["big-lama", "lama-fourier", "tiny"])
def test_infer_config_rebuilds_the_official_layout(config):
    with torch.device("meta"):
        cfg = infer_config(FFCResNetGenerator(**FIXTURE["configs"][config]).state_dict())
        rebuilt = FFCResNetGenerator(**generator_config(cfg))
    assert {k: list(v.shape) for k, v in rebuilt.state_dict().items()} == FIXTURE["keys"][config]
    assert cfg["n_blocks"] == FIXTURE["configs"][config]["n_blocks"]


@pytest.mark.parametrize("size", [(8, 8), (12, 10), (7, 9), (16, 33)])
def test_matmul_dft_is_torch_fft(size):
    """The matrix-product transform against torch.fft, forward and inverse, on spectra that are not Hermitian."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    re, im = rdft2(x, "matmul")
    spec = torch.fft.rfft2(x, norm="ortho")
    assert torch.allclose(re, spec.real, atol=1e-12) and torch.allclose(im, spec.imag, atol=1e-12)
    re, im = torch.randn(re.shape, generator=g, dtype=torch.float64), torch.randn(im.shape, generator=g, dtype=torch.float64)
    want = torch.fft.irfft2(torch.complex(re, im), s=size, norm="ortho")
    assert torch.allclose(irdft2(re, im, size, "matmul"), want, atol=1e-12)


def test_matmul_and_fft_lama_agree():
    torch.manual_seed(0)
    fft, mat = LaMa(TINY).eval(), LaMa(TINY, dft="matmul").eval()
    mat.load_state_dict(fft.state_dict())
    x = torch.cat([torch.rand(1, 3, 40, 56) * 2 - 1, (torch.rand(1, 1, 40, 56) > 0.7).float()], 1)
    with torch.no_grad():
        assert (fft(x) - mat(x)).abs().max() < 1e-5


def test_toolkit_call_pads_and_crops_and_refuses_bad_input():
    torch.manual_seed(0)
    model = LaMa(TINY).eval()
    x = torch.cat([torch.rand(2, 3, 37, 50) * 2 - 1, torch.zeros(2, 1, 37, 50)], 1)
    x[:, 3:, 10:20, 5:30] = 1
    with torch.no_grad():
        out = model(x)
        padded = torch.nn.functional.pad((x[:, :3] + 1) / 2 * (1 - x[:, 3:]), (0, 6, 0, 3), mode="reflect")
        mask = torch.nn.functional.pad(x[:, 3:], (0, 6, 0, 3), mode="reflect")
        direct = model.generator(torch.cat([padded, mask], 1))[..., :37, :50] * 2 - 1
    assert out.shape == (2, 3, 37, 50) and torch.allclose(out, direct, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\).*image \* \(1 - mask\)"):
        model(x[:, :3])
    with pytest.raises(ValueError, match="divisible by 8"):
        model.generator(torch.zeros(1, 4, 36, 36))
    with pytest.raises(ValueError, match="unsupported LaMa generator option"):
        LaMa("big-lama", out_ffc=True)
    with pytest.raises(ValueError, match="unknown LaMa config 'huge-lama'"):
        LaMa("huge-lama")


def test_star_attaches_to_the_encoder_and_exports():
    adapter = kdinpaint.get_adapter("lama")
    assert adapter.stride == 8 and adapter.spec.input == "concat" and adapter.variants == ["star"]
    student, teacher = adapter.student("star", ngf=8, n_blocks=2), adapter.teacher("star", ngf=8, n_blocks=2)
    kd = kdinpaint.attach(student, teacher, spec="lama:star")
    assert kd.levels == ["generator.model.2", "generator.model.3", "generator.model.4"] and kd.sites == kd.levels
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    mask = torch.zeros(2, 1, 32, 48)
    mask[:, :, 8:20, 10:30] = 1
    pred = student(torch.cat([image * (1 - mask), mask], 1))
    losses = kd.losses(target=image)
    assert torch.isfinite(losses["total"]) and losses["cross"] > 0 and losses["self"] > 0
    (pred.abs().mean() + losses["total"]).backward()
    assert student.generator.model[1].ffc.convl2l.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    exported = kd.export().eval()
    student.eval()
    with torch.no_grad():
        x = torch.cat([image * (1 - mask), mask], 1)
        assert torch.equal(exported(x), student(x))
    kd.detach()
