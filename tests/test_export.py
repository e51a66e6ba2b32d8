"""export(): student + completion blocks, standalone, bit-identical, safetensors round trip."""

import pytest
import torch
from tiny import LEVELS, TinyUNet, batch

import kdinpaint


def _attached():
    torch.manual_seed(0)
    student = TinyUNet()
    teacher = kdinpaint.build_teacher(student)
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS})
    with torch.no_grad():
        for block in kd.blocks.values():
            block.conv.f_ker.weight.normal_(0, 0.3)
            block.conv.f_off.weight.normal_(0, 0.3)
    return student, kd


def test_export_is_bit_identical_and_standalone(tmp_path):
    student, kd = _attached()
    image, mask = batch()
    exported = kd.export()
    student.eval()
    exported.eval()
    with torch.no_grad():
        attached_out = student(image, mask)
        out = exported(image, mask)
    assert torch.equal(out, attached_out)
    # nothing training-only, no hook anywhere
    keys = list(exported.state_dict())
    assert not any(k.startswith(("gamma", "rho", "phi", "align", "teacher")) for k in keys)
    assert any(".block.conv.f_ker" in k for k in keys)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in exported.modules())
    kd.detach()
    with torch.no_grad():
        assert torch.equal(exported(image, mask), attached_out)  # still the same without the Distiller

    path = tmp_path / "student.safetensors"
    kdinpaint.save_exported(exported, path)
    reloaded = kdinpaint.load_exported(path, TinyUNet()).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(image, mask), attached_out)


def test_exported_reference_net8_attends_to_the_holes_as_attached():
    # the decoder attention of the reference network refines the holes only; wrapped by its PGL fusion site in
    # the exported model it must still get the mask (a trained, non-zero gate shows the difference)
    from kdinpaint.plugins import get_adapter

    adapter = get_adapter("reference")
    torch.manual_seed(0)
    student = adapter.student(None, width=4)
    kd = kdinpaint.attach(student, adapter.teacher(None, width=4), adapter.spec)
    with torch.no_grad():
        for name, p in [*student.named_parameters(), *kd.named_parameters()]:
            if name.endswith("gate") or "fusion" in name:
                p.normal_(0, 0.3)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:20, 4:28] = 1
    mask[1, :, 16:32, 0:12] = 1
    exported = kd.export().eval()
    student.eval()
    with torch.no_grad():
        assert torch.equal(exported(image * (1 - mask), mask), student(image * (1 - mask), mask))
    kd.detach()


class _ReadsAttributes(TinyUNet):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(8, 8, 1)

    def forward(self, image, mask):
        assert self.proj.out_channels == 8  # a forward that reads an attribute of a completion site
        x = self.proj(self.stem(torch.cat([image * (1 - mask), mask], 1)))
        return self.head(torch.nn.functional.leaky_relu(x))


def test_export_mid_step_keeps_the_captured_features():
    # exporting between the forward and kd.losses() (e.g. a checkpoint hook) must not drop the captures:
    # the losses equal those of the same step without the export
    student, kd = _attached()
    image, mask = batch()
    student(image * (1 - mask), mask)
    expected = kd.losses(target=image)["total"].item()
    student(image * (1 - mask), mask)
    kd.export()
    assert kd.losses(target=image)["total"].item() == expected
    kd.detach()


def test_export_keeps_the_original_attributes_reachable():
    torch.manual_seed(0)
    net = _ReadsAttributes()
    kd = kdinpaint.attach(net, None, {"encoder_levels": ["proj"], "cross_distillation": False})
    exported = kd.export().eval()
    image, mask = batch()
    with torch.no_grad():
        assert torch.equal(exported(image, mask), net.eval()(image, mask))
    assert exported.model.proj.out_channels == 8 and exported.model.proj.inner.kernel_size == (1, 1)
    kd.detach()


def test_load_exported_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not written by kdinpaint"):
        kdinpaint.load_exported(path, TinyUNet())
    student, kd = _attached()
    good = tmp_path / "good.safetensors"
    kdinpaint.save_exported(kd.export(), good)
    kd.detach()
    with pytest.raises(ValueError, match="does not fit"):
        kdinpaint.load_exported(good, TinyUNet(width=4))


def test_checkpoint_rebuilds_from_the_file_alone(tmp_path):
    adapter = kdinpaint.get_adapter("tiny-unet")
    torch.manual_seed(0)
    student = adapter.student("no-cb", width=8)
    kd = kdinpaint.attach(student, adapter.teacher("no-cb", width=8), adapter.spec.variant("no-cb"))
    path = tmp_path / "ckpt.safetensors"
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet:no-cb", builder_kwargs={"width": 8})
    kd.detach()
    model, which = kdinpaint.load_checkpoint(path, expected="tiny-unet")
    assert which == "tiny-unet:no-cb"
    image, mask = batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(image, mask), student.eval()(image, mask))
    with pytest.raises(ValueError, match="checkpoint of 'tiny-unet:no-cb', but 'reference' was expected"):
        kdinpaint.load_checkpoint(path, expected="reference")
    with pytest.raises(ValueError, match="but 'tiny-unet:wide' was expected"):
        kdinpaint.load_checkpoint(path, expected="tiny-unet:wide")


def test_a_file_written_before_the_bounds_loads_unbounded(tmp_path):
    """Files exported before ``completion.kernel_limit`` / ``offset_limit`` existed were trained unbounded and
    load that way; new files keep the bounds they were trained with."""
    import yaml
    from safetensors.torch import load_file, save_file

    from kdinpaint.blocks import AdaptiveConv

    student, kd = _attached()
    with torch.no_grad():  # kernels beyond the default limit, so that the bound shows in the output
        for block in kd.blocks.values():
            block.conv.f_ker.weight.normal_(0, 3.0)
    image, mask = batch()
    path = tmp_path / "new.safetensors"
    kdinpaint.save_exported(kd.export(), path)
    new = kdinpaint.load_exported(path, TinyUNet()).eval()
    convs = lambda m: [c for c in m.modules() if isinstance(c, AdaptiveConv)]  # noqa: E731
    assert convs(new) and all(c.kernel_limit == 1.0 and c.offset_limit == 3.0 for c in convs(new))

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    spec = yaml.safe_load(meta["kdinpaint.spec"])
    del spec["completion"]["kernel_limit"], spec["completion"]["offset_limit"]
    meta["kdinpaint.spec"] = yaml.safe_dump(spec, sort_keys=False)
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    legacy = kdinpaint.load_exported(old, TinyUNet()).eval()
    assert convs(legacy) and all(c.kernel_limit is None and c.offset_limit is None for c in convs(legacy))
    with torch.no_grad():
        assert not torch.allclose(legacy(image, mask), new(image, mask))


# ---- a file's metadata never builds objects or calls functions ------------------------------------------------
def _crafted(path, **metadata):
    """A safetensors file with one tensor and the given metadata, as anyone can write it."""
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, str(path), metadata={"kdinpaint.sites": "[]", "kdinpaint.site_channels": "[]",
                                                               "kdinpaint.adapter": "tiny-unet", **metadata})
    return path


def test_a_tagged_spec_in_a_files_metadata_never_runs_and_names_the_file(tmp_path):
    from kdinpaint.export import load_checkpoint, load_exported

    marker = tmp_path / "payload-ran"
    code = f"open({str(marker)!r}, 'w').close()"
    tagged = {
        "python/object/apply": f"!!python/object/apply:builtins.exec [{code!r}]",
        "python/object/new": f"name: x\nencoder_levels: !!python/object/new:builtins.exec [{code!r}]",
        "python/name": "!!python/name:os.system",
    }
    for kind, spec in tagged.items():
        path = _crafted(tmp_path / f"{kind.replace('/', '-')}.safetensors", **{"kdinpaint.spec": spec})
        for load in (lambda: load_checkpoint(path), lambda: load_exported(path, TinyUNet())):
            with pytest.raises(ValueError, match=rf"{path.name}: metadata 'kdinpaint.spec' is not a plain YAML spec"):
                load()
        assert not marker.exists(), kind
    # the payload is live: an unsafe YAML loader would have run it
    import yaml

    yaml.unsafe_load(tagged["python/object/apply"])
    assert marker.exists()


@pytest.mark.parametrize(("key", "value", "match"), [
    ("kdinpaint.builder_kwargs", "{'width': 4", r"metadata 'kdinpaint.builder_kwargs' is not valid JSON"),
    ("kdinpaint.builder_kwargs", "[1, 2]", r"metadata 'kdinpaint.builder_kwargs' is \[1, 2\], not a dict"),
    ("kdinpaint.sites", '"down1"', r"metadata 'kdinpaint.sites' is 'down1', not a list of str"),
    ("kdinpaint.site_channels", '["8"]', r"metadata 'kdinpaint.site_channels' is \['8'\], not a list of int"),
    ("kdinpaint.spec", "- a\n- b", r"metadata 'kdinpaint.spec' holds a list, not a spec mapping"),
    ("kdinpaint.spec", "{encoder_levels: 3}", r"metadata 'kdinpaint.spec' is not a valid spec"),
])
def test_malformed_metadata_names_the_file_and_the_key(tmp_path, key, value, match):
    from kdinpaint.export import load_checkpoint

    path = _crafted(tmp_path / "bad.safetensors", **{"kdinpaint.spec": "{}", key: value})
    with pytest.raises(ValueError, match=rf"bad.safetensors: {match}"):
        load_checkpoint(path)


def test_a_file_naming_a_function_as_its_network_is_refused_before_calling_it(tmp_path):
    """kdinpaint.target names what is built with the file's builder kwargs: a function there (subprocess.run with
    a command) would run that command. Only an nn.Module class is accepted."""
    from kdinpaint.export import load_checkpoint

    marker = tmp_path / "command-ran"
    import json
    import sys

    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    path = _crafted(tmp_path / "run.safetensors", **{"kdinpaint.spec": "{}", "kdinpaint.target": "subprocess:run",
                                                     "kdinpaint.builder_kwargs": json.dumps({"args": argv})})
    with pytest.raises(ValueError, match=r"run.safetensors names 'subprocess:run' as its network, a module of Python's "
                                         r"standard library"):  # refused before it is even imported
        load_checkpoint(path)
    assert not marker.exists()
    path = _crafted(tmp_path / "main.safetensors", **{"kdinpaint.spec": "{}", "kdinpaint.target": "kdinpaint.cli:main",
                                                      "kdinpaint.builder_kwargs": json.dumps({"argv": ["--help"]})})
    with pytest.raises(ValueError, match=r"main.safetensors names 'kdinpaint.cli:main' as its network, which is not a "
                                         r"torch.nn.Module class"):
        load_checkpoint(path)
