"""A user's own model: one-tensor (concat) inputs, glob rules, scale-aware distillation, compression teachers."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny import LEVELS, TinyUNet, batch

import kdinpaint
from kdinpaint._modules import glob_match, resolve
from kdinpaint.inference import Inpainter
from kdinpaint.suggest import analyse


class ConcatNet(nn.Module):
    """TinyUNet behind LaMa's convention: one tensor cat([image * (1 - mask), mask], 1) (or mask first)."""

    def __init__(self, mask_first: bool = False):
        super().__init__()
        self.net = TinyUNet()
        self.mask_first = mask_first

    def forward(self, x):
        image, mask = (x[:, 1:], x[:, :1]) if self.mask_first else (x[:, :3], x[:, 3:])
        return self.net(image, mask)


def _concat(image, mask, mask_first=False):
    return torch.cat([mask, image * (1 - mask)] if mask_first else [image * (1 - mask), mask], 1)


def _pairs(seed=0, **kw):
    torch.manual_seed(seed)
    student = ConcatNet(**kw)
    teacher = kdinpaint.build_teacher(student)
    return student, teacher


# ---- input: concat ------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_first", [False, True])
def test_concat_losses_equal_the_two_argument_model(mask_first):
    """The same weights attached through the concat wrapper and as the plain two-argument network give the
    same distillation terms: the convention splits the one tensor into the image and the mask exactly."""
    student, teacher = _pairs(mask_first=mask_first)
    image, mask = batch()
    spec = {"encoder_levels": [f"net.{p}" for p in LEVELS], "input": "concat_mask_first" if mask_first else "concat"}
    torch.manual_seed(1)
    kd = kdinpaint.attach(student, teacher, spec)
    student(_concat(image, mask, mask_first))
    got = kd.losses(target=image)
    kd.detach()
    torch.manual_seed(1)  # the same f_l initialisation
    kd = kdinpaint.attach(student.net, teacher.net, {"encoder_levels": LEVELS})
    student.net(image * (1 - mask), mask)
    want = kd.losses(target=image)
    kd.detach()
    got = {k.replace("/net.", "/"): v for k, v in got.items()}
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert want["cross"] > 0 and want["self"] > 0


def test_concat_export_load_and_inpainter(tmp_path):
    student, teacher = _pairs()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, {"encoder_levels": [f"net.{p}" for p in LEVELS], "input": "concat"})
    with torch.no_grad():
        for block in kd.blocks.values():
            block.conv.f_ker.weight.normal_(0, 0.3)
    student.eval()
    with torch.no_grad():
        hooked = student(_concat(image, mask))
    exported = kd.export().eval()
    kdinpaint.save_exported(exported, tmp_path / "m.safetensors")
    loaded = kdinpaint.load_exported(tmp_path / "m.safetensors", ConcatNet()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_concat(image, mask)), hooked, rtol=0, atol=0)
    out = Inpainter(loaded, spec=loaded.spec, stride=8)(image, mask)
    want = torch.where(mask.bool(), hooked.clamp(-1, 1), image)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    kd.detach()


def test_one_tensor_model_errors_suggest_concat():
    student, teacher = _pairs()
    with pytest.raises(ValueError, match="input: concat"):
        kdinpaint.attach(student, teacher, {"encoder_levels": ["net.down1"]})
    with pytest.raises(TypeError, match="input: concat"):
        kdinpaint.attach(student, teacher, {"encoder_levels": ["net.down1"], "mask_arg": None})
    with pytest.raises(ValueError, match="input"):
        kdinpaint.AdapterSpec(input="stacked")


@pytest.mark.parametrize("mask_first", [False, True])
def test_suggest_detects_concat(mask_first):
    torch.manual_seed(0)
    image, mask = batch()
    result = analyse(ConcatNet(mask_first), (_concat(image, mask, mask_first),))
    assert result.spec.input == ("concat_mask_first" if mask_first else "concat")
    assert result.spec.encoder_levels == [f"net.{p}" for p in LEVELS]
    assert result.spec.probe_shape == [1, 3, 32, 32]
    kd = kdinpaint.attach(ConcatNet(mask_first), None, {**result.spec.to_dict(), "cross_distillation": False})
    kd.detach()


# ---- globs --------------------------------------------------------------------------------------
class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict(
            {f"layer{i}": nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())) for i in (1, 2)}
        )
        self.conv = nn.Conv2d(4, 4, 1)


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("encoder.*", ["encoder.layer1", "encoder.layer2"]),
        ("encoder.layer*", ["encoder.layer1", "encoder.layer2"]),
        ("encoder.*.0", ["encoder.layer1.0", "encoder.layer2.0"]),
        ("encoder.**.0", ["encoder.layer1.0", "encoder.layer1.1.0", "encoder.layer2.0", "encoder.layer2.1.0"]),
        ("**.1", ["encoder.layer1.1", "encoder.layer1.1.1", "encoder.layer2.1", "encoder.layer2.1.1"]),
        ("encoder.layer1.**", ["encoder.layer1.0", "encoder.layer1.1", "encoder.layer1.1.0", "encoder.layer1.1.1"]),
        ("encoder.layer[!1]", ["encoder.layer2"]),
        ("*", ["encoder", "conv"]),
    ],
)
def test_glob_rule(pattern, expected):
    assert resolve(Nested(), [pattern], what="test") == expected
    names = [n for n, _ in Nested().named_modules() if n]
    # a hand-written reference of the rule: `*` never crosses a dot; `**` spans segments
    assert [n for n in names if glob_match(n, pattern)] == expected


def test_implausible_expansion_warns():
    torch.manual_seed(0)
    student = TinyUNet(norm=True)  # down1 = (conv, batchnorm, activation): `down*.*` is nine modules
    with pytest.warns(UserWarning, match=r"9 modules at only 3 resolutions.*`\*` matches one path segment"):
        kd = kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": ["down*.*"]})
    kd.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": ["down*"]}).detach()


# ---- scale-aware distillation ---------------------------------------------------------------------
def _features(model, paths, *call):
    feats, handles = {}, []
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: feats.__setitem__(p, o.detach())))
    with torch.no_grad():
        model(*call)
    for h in handles:
        h.remove()
    return feats


def test_feature_scale_divides_each_term_by_its_targets_mean_square():
    torch.manual_seed(0)
    student = TinyUNet()
    teacher = kdinpaint.build_teacher(student)
    image, mask = batch()
    terms = {}
    for scale in ("plain", "feature"):
        torch.manual_seed(1)
        kd = kdinpaint.attach(student, teacher, {"encoder_levels": LEVELS, "completion_sites": [], "distill_scale": scale})
        student(image, mask)
        terms[scale] = {k: v.detach() for k, v in kd.losses(target=image).items()}
        kd.detach()
    t = _features(teacher, LEVELS, image, torch.zeros_like(mask))
    s = _features(student, LEVELS, image, mask)
    for i, p in enumerate(LEVELS):
        torch.testing.assert_close(terms["feature"][f"cross/{p}"], terms["plain"][f"cross/{p}"] / t[p].pow(2).mean())
        if i + 1 < len(LEVELS):
            deeper = s[LEVELS[i + 1]]
            torch.testing.assert_close(terms["feature"][f"self/{p}"], terms["plain"][f"self/{p}"] / deeper.pow(2).mean())


def test_feature_scale_is_invariant_to_the_networks_feature_scale():
    """Scaling every weight of a ReLU network's first two convolutions by k scales its level features by k^2
    (biases scaled too): the plain terms grow by k^4, the feature-scaled ones do not change."""
    image, mask = batch()

    def terms(k, scale):
        torch.manual_seed(0)
        student = TinyUNet()
        for m in student.modules():
            if isinstance(m, nn.LeakyReLU):
                m.negative_slope = 0.0  # positively homogeneous
        teacher = kdinpaint.build_teacher(student)
        with torch.no_grad():
            for net in (student, teacher):
                for name in ("stem", "down1"):
                    conv = getattr(net, name)[0]
                    conv.weight.mul_(k)
                    conv.bias.mul_(k ** (1 if name == "stem" else 2))
        torch.manual_seed(1)
        kd = kdinpaint.attach(student, teacher, {"encoder_levels": ["down1"], "completion_sites": [], "distill_scale": scale})
        student(image, mask)
        out = kd.losses(target=image)["cross"].detach()
        kd.detach()
        return out

    torch.testing.assert_close(terms(3.0, "plain"), terms(1.0, "plain") * 81, rtol=1e-4, atol=0)
    torch.testing.assert_close(terms(3.0, "feature"), terms(1.0, "feature"), rtol=1e-4, atol=0)


# ---- compression teacher -------------------------------------------------------------------------
class OtherTeacher(nn.Module):
    """A teacher of another architecture and convention: one concatenated tensor, levels of other widths and
    resolutions (1/1, 1/2, 1/4 where the student has 1/2, 1/4, 1/8), returns (prediction, extra)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 6, 3, 1, 1), nn.ELU())
        self.b = nn.Sequential(nn.Conv2d(6, 10, 3, 2, 1), nn.ELU())
        self.c = nn.Sequential(nn.Conv2d(10, 12, 3, 2, 1), nn.ELU())
        self.head = nn.Conv2d(12, 3, 1)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        y = self.c(self.b(self.a(x)))
        return torch.tanh(F.interpolate(self.head(y), scale_factor=4.0)), y


COMPRESSION = {
    "encoder_levels": LEVELS,
    "teacher_levels": ["a", "b", "c"],
    "teacher_input": "student_input",
    "teacher_call": {"input": "concat", "output": 0},
    "output_distillation": 0.5,
    "completion_sites": [],
}


def test_compression_teacher_terms_by_hand():
    torch.manual_seed(0)
    student, teacher = TinyUNet(), OtherTeacher()
    image, mask = batch()
    kd = kdinpaint.attach(student, teacher, COMPRESSION)
    pred = student(image, mask)
    got = kd.losses(target=image)
    # the teacher saw the student's input: the ground truth with the holes zeroed, and the mask
    torch.testing.assert_close(teacher.seen, torch.cat([image * (1 - mask), mask], 1), rtol=0, atol=0)
    with torch.no_grad():
        t_pred, _ = teacher(torch.cat([image * (1 - mask), mask], 1))
        t = _features(teacher, ["a", "b", "c"], torch.cat([image * (1 - mask), mask], 1))
        s = _features(student, LEVELS, image, mask)
    hole = mask.bool().expand_as(pred)
    torch.testing.assert_close(got["output"], (pred - t_pred).abs()[hole].mean(), rtol=1e-5, atol=1e-7)
    cross = 0.0
    for i, (sp, tp) in enumerate(zip(LEVELS, ["a", "b", "c"])):
        ref = F.interpolate(t[tp], size=s[sp].shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        assert kd.gamma[str(i)].conv.weight.shape[:2] == (s[sp].shape[1], t[tp].shape[1])  # widths differ
        g = kd.gamma[str(i)](ref)
        w = kd.rho[str(i)](ref)  # uniform at initialisation
        m = F.max_pool2d(mask, mask.shape[-1] // s[sp].shape[-1])
        term = (((s[sp] - g) ** 2 * m).sum((2, 3)) * w).sum() / m.sum()
        torch.testing.assert_close(got[f"cross/{sp}"], term, rtol=1e-5, atol=1e-7)
        cross = cross + term
    total = got["cross"] + got["self"] + 0.5 * got["output"]
    torch.testing.assert_close(got["total"], total)
    # the output term trains the student: gradient reaches it
    got["total"].backward()
    assert student.head.weight.grad.abs().sum() > 0
    kd.detach()


def test_same_architecture_levels_of_another_size_are_still_refused():
    torch.manual_seed(0)
    student = TinyUNet()
    with pytest.raises(ValueError, match="another architecture is resampled"):
        kdinpaint.attach(student, kdinpaint.build_teacher(student), {"encoder_levels": ["down1"], "teacher_levels": ["down2"]})


def test_output_distillation_needs_matching_predictions():
    torch.manual_seed(0)
    spec = {**COMPRESSION, "teacher_call": {"input": "concat", "output": 1}}  # the feature, not the prediction
    with pytest.raises(ValueError, match="teacher_call.output"):
        kdinpaint.attach(TinyUNet(), OtherTeacher(), spec)


# ---- smaller fixes ------------------------------------------------------------------------------
def test_pretrain_on_a_used_up_iterator_says_so():
    torch.manual_seed(0)
    teacher = TinyUNet()
    images = batch()[0]
    with pytest.raises(ValueError, match="ran out of data after 2 of 5 steps.*iterated again"):
        kdinpaint.pretrain(teacher, iter([images, images]), steps=5, spec={"mask_arg": "mask"})
    with pytest.raises(ValueError, match="empty"):
        kdinpaint.pretrain(teacher, [], steps=5)


def test_adapter_spec_without_a_name_takes_the_adapters():
    from kdinpaint.adapter import Adapter

    adapter = Adapter(name="my-net", spec={"encoder_levels": ["down1"]}, build_student=TinyUNet, description="mine")
    assert adapter.spec.name == "my-net" and adapter.spec.description == "mine"
    named = Adapter(name="x", spec={"name": "own", "description": "d", "encoder_levels": []}, build_student=TinyUNet)
    assert named.spec.name == "own" and named.spec.description == "d"


def test_cli_spec_suggest_finds_a_one_tensor_model_in_the_current_folder(tmp_path, monkeypatch, capsys):
    from kdinpaint.cli import main

    (tmp_path / "mynets_issue15.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.down = nn.ModuleList([nn.Conv2d(4, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)])\n"
        "        self.head = nn.Conv2d(8, 3, 1)\n\n"
        "    def forward(self, x):\n"
        "        for d in self.down:\n"
        "            x = torch.relu(d(x))\n"
        "        return torch.nn.functional.interpolate(self.head(x), scale_factor=4.0)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    try:
        assert main(["spec", "suggest", "--model", "mynets_issue15:Net", "--shape", "1,3,32,32"]) == 0
    finally:
        __import__("sys").modules.pop("mynets_issue15", None)
    out = capsys.readouterr().out
    spec = kdinpaint.AdapterSpec.from_dict({k: v for k, v in __import__("yaml").safe_load(out).items()})
    assert spec.input == "concat" and spec.encoder_levels == ["down.0", "down.1"]


def test_cli_spec_show_names_a_plugin_adapter(capsys):
    from kdinpaint import plugins
    from kdinpaint.adapter import Adapter
    from kdinpaint.cli import main
    from kdinpaint.hookspecs import hookimpl

    class Plugin:
        __name__ = "issue15-plugin"

        @hookimpl
        def register_adapters(self, register):
            register(Adapter(name="issue15-net", spec={"encoder_levels": ["down1"]}, build_student=TinyUNet,
                             description="a test network"))

    plugins.load_plugins()
    plugins.pm.register(Plugin(), name="issue15-plugin")
    try:
        assert main(["spec", "show", "issue15-net"]) == 0
    finally:
        plugins.pm.unregister(name="issue15-plugin")
    out = capsys.readouterr().out
    assert "name: issue15-net\n" in out and "description: a test network\n" in out


@pytest.mark.slow
def test_reverse_hg_is_exact_with_feature_scale_output_term_and_concat_input():
    """Algorithm 1's hypergradient through the new terms equals central finite differences of the unrolled
    inner steps (written out independently in test_bilevel)."""
    from kdinpaint.train.bilevel import MetaLearner
    from test_bilevel import _central_difference, _mse, _random_direction, _unrolled_inpaint_loss

    torch.manual_seed(0)
    student = ConcatNet().double()
    teacher = kdinpaint.build_teacher(student)
    image, mask = (t.double() for t in batch(2, 16))
    spec = {"encoder_levels": [f"net.{p}" for p in LEVELS], "input": "concat", "distill_scale": "feature",
            "output_distillation": 0.5}
    kd = kdinpaint.attach(student, teacher, spec, example_inputs=(_concat(image, mask),))
    with torch.no_grad():
        for p in kd.meta_parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for block in kd.blocks.values():
            block.conv.f_ker.weight.normal_(0, 0.2)
    theta = [*student.parameters(), *kd.student_parameters()]
    # small steps: the feature-scaled terms of this tiny random network are large (its features are small)
    learner = MetaLearner(kd, torch.optim.SGD(theta, lr=1e-4), _mse, mode="reverse_hg", steps=2)
    theta0 = {n: p.detach().clone() for n, p in kd.named_parameters() if n in learner._theta_names}
    inputs = (_concat(image, mask),)
    hyper = learner.hypergradient(theta0, inputs, {}, image)
    direction = _random_direction(kd, hyper, 1)
    unrolled = lambda: _unrolled_inpaint_loss(student, kd, theta, inputs, image, 1e-4, 2)  # noqa: E731
    fd = _central_difference(kd, direction, unrolled, eps=1e-4)  # 1e-5 and below: round-off dominates here
    analytic = sum((hyper[n] * u).sum() for n, u in direction.items()).item()
    assert abs(fd) > 1e-8
    assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)
    kd.detach()
