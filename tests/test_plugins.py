"""The plugin layer: entry points made visible for real (temporary ``.dist-info`` folders on ``sys.path``),
broken plugins, strict mode, duplicates, unknown names, the load restriction and the registries."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import kdinpaint
from kdinpaint import hookspecs, plugins
from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "examples" / "plugin-adapter"


def make_dist(root: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> None:
    """A distribution as an installer leaves it: ``<name>-<version>.dist-info`` with METADATA and entry_points.txt."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[kdinpaint]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def example_plugin_dist(root: Path) -> Path:
    """The example plugin's own pyproject entry points as an installed dist; returns its source folder."""
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    make_dist(root, project["name"], project["version"], project["entry-points"]["kdinpaint"])
    return PLUGIN_DIR / "src"


BROKEN = {
    # an import error (a dependency that is not installed)
    "kdinpaint-broken-import": ("kdp_broken_import", "import kdp_not_installed_anywhere\n"),
    # a hook that raises
    "kdinpaint-raising-hook": (
        "kdp_raising_hook",
        """
        from kdinpaint.hookspecs import hookimpl

        @hookimpl
        def register_adapters(register):
            raise RuntimeError("weights folder missing")
        """,
    ),
    # a misspelt hook name (pluggy's check_pending)
    "kdinpaint-typo-hook": (
        "kdp_typo_hook",
        """
        from kdinpaint.hookspecs import hookimpl

        @hookimpl
        def register_adapter(register):
            pass
        """,
    ),
}


@pytest.fixture
def dists(tmp_path, monkeypatch):
    """A site folder on sys.path with the example plugin and three broken plugins installed; clean env."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(example_plugin_dist(site)))
    for dist, (module, source) in BROKEN.items():
        make_dist(site, dist, "1.0", {module.removeprefix("kdp_"): module}, {module: source})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.LOAD_ENV, raising=False)
    monkeypatch.delenv(plugins.STRICT_ENV, raising=False)
    importlib.invalidate_caches()
    plugins.load_plugins(reload=True)
    yield site
    monkeypatch.undo()
    for name in ["kdinpaint_toy_resnet", *(m for m, _ in BROKEN.values())]:
        sys.modules.pop(name, None)
    plugins.load_plugins(reload=True)


def reload(monkeypatch, **env: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugins.load_plugins(reload=True)


class TemporaryPlugin:
    """The llm/datasette pattern: a plugin object registered for one test and unregistered after."""

    __name__ = "TemporaryPlugin"

    def __init__(self, **hooks):
        for name, fn in hooks.items():
            setattr(self, name, hookimpl(fn))


@pytest.fixture
def temporary_plugin():
    registered = []

    def add(name: str, **hooks) -> object:
        plugin = TemporaryPlugin(**hooks)
        plugins.load_plugins()
        plugins.pm.register(plugin, name=name)
        registered.append(name)
        return plugin

    yield add
    for name in registered:
        if plugins.pm.has_plugin(name):
            plugins.pm.unregister(name=name)


# ---- built-in adapters go through the entry-point group -------------------------------------------
def test_hook_register_adapters_builtin_through_entry_point():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["kdinpaint"]
    assert declared["tiny"] == "kdinpaint_adapters.tiny"
    installed = {ep.name: ep for ep in metadata.entry_points(group="kdinpaint") if ep.dist.name == "kdinpaint"}
    assert installed["tiny"].value == "kdinpaint_adapters.tiny", "reinstall the project: pip install -e ."
    plugins.load_plugins(reload=True)
    adapter = plugins.get_adapter("tiny-unet")
    assert isinstance(adapter, Adapter)
    assert (adapter.distribution, adapter.version) == ("kdinpaint", metadata.version("kdinpaint"))
    assert adapter.variants == ["no-cb", "no-self", "wide"]
    wide = adapter.student("wide")
    assert wide.enc1[0].out_channels == 32 and adapter.student().enc1[0].out_channels == 16


def test_example_plugin_listed_and_attach_by_name(dists):
    adapters = {a.name: a for a in plugins.list_adapters()}
    assert {"tiny-unet", "toy-resnet"} <= set(adapters)
    toy = adapters["toy-resnet"]
    assert (toy.distribution, toy.version) == ("kdinpaint-toy-resnet", "0.1.0")
    assert type(toy.student()).__module__ == "kdinpaint_toy_resnet"

    student, teacher = toy.student(), toy.teacher()
    kd = kdinpaint.attach(student, teacher, spec="toy-resnet")
    assert kd.levels == ["enc1", "middle"] and kd.sites == ["enc1", "middle"]
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    hole = torch.zeros(2, 1, 32, 32)
    hole[:, :, 8:20, 10:24] = 1
    pred = student(image, hole)  # the model's own call convention: (x, hole)
    losses = kd.losses(target=image)
    assert torch.isfinite(losses["total"]) and losses["total"] > 0
    (pred.abs().mean() + losses["total"]).backward()
    assert student.enc1[0].weight.grad is not None and student.enc1[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # frozen teacher
    kd.detach()

    plain = toy.student()
    kd = kdinpaint.attach(plain, toy.teacher(), spec="toy-resnet:no-cb")
    assert kd.sites == [] and kd.spec.name == "toy-resnet:no-cb"
    kd.detach()

    # the adapter's checkpoint filter: an "official" checkpoint with a generator. prefix loads strictly
    official = {f"generator.{k}": v.clone() for k, v in student.state_dict().items()}
    official["discriminator.conv.weight"] = torch.zeros(1)
    fresh = toy.student()
    fresh.load_state_dict(toy.checkpoint_filter_fn(official, fresh), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), student.state_dict().values()))


def test_broken_plugins_reported_by_distribution_and_others_still_load(dists):
    names = {a.name for a in plugins.list_adapters()}
    assert {"tiny-unet", "toy-resnet"} <= names
    failures = {f.distribution: f for f in plugins.plugin_failures()}
    assert set(failures) == set(BROKEN)
    assert "ModuleNotFoundError" in failures["kdinpaint-broken-import"].error
    assert "kdp_not_installed_anywhere" in failures["kdinpaint-broken-import"].error
    assert "weights folder missing" in failures["kdinpaint-raising-hook"].error
    assert "register_adapter" in failures["kdinpaint-typo-hook"].error
    assert all(f.version == "1.0" for f in failures.values())
    assert "kdinpaint-raising-hook 1.0" in str(failures["kdinpaint-raising-hook"])
    # the misspelt plugin is not left half-registered
    assert not any(name.startswith("kdinpaint-typo-hook") for name, _ in plugins.pm.list_name_plugin())
    # an unknown name lists the known adapters and the plugins that failed
    with pytest.raises(ValueError) as err:
        plugins.get_adapter("toy-resnt")
    message = str(err.value)
    assert "'toy-resnet'" in message and "'tiny-unet'" in message and "did you mean" in message
    assert all(dist in message for dist in BROKEN)


def test_strict_mode_makes_failures_fatal(dists, monkeypatch):
    with pytest.raises(plugins.PluginError, match="kdinpaint-broken-import"):
        plugins.load_plugins(strict=True)
    with pytest.raises(plugins.PluginError, match="kdinpaint-typo-hook"):
        plugins.list_adapters(strict=True)
    monkeypatch.setenv(plugins.STRICT_ENV, "1")
    with pytest.raises(plugins.PluginError, match="kdinpaint-broken-import"):
        plugins.load_plugins(reload=True)
    with pytest.raises(plugins.PluginError):
        plugins.get_adapter("tiny-unet")
    assert plugins.get_adapter("tiny-unet", strict=False).name == "tiny-unet"  # the argument wins over the env
    # a hook that raises is fatal in strict mode even when every import succeeded
    monkeypatch.setenv(plugins.LOAD_ENV, "kdinpaint-raising-hook")
    plugins.load_plugins(reload=True)
    with pytest.raises(plugins.PluginError, match="kdinpaint-raising-hook 1.0.*weights folder missing"):
        plugins.list_adapters()


EXITING = {  # plugins that end the program instead of raising: at import, or in a hook
    "kdinpaint-exits-at-import": ("kdp_exits_at_import", "import sys\nsys.exit(0)\n"),
    "kdinpaint-exits-in-hook": (
        "kdp_exits_in_hook",
        """
        import sys
        from kdinpaint.hookspecs import hookimpl

        @hookimpl
        def register_adapters(register):
            sys.exit(3)
        """,
    ),
}


@pytest.fixture
def exiting(dists, monkeypatch):
    for dist, (module, source) in EXITING.items():
        make_dist(dists, dist, "2.0", {module.removeprefix("kdp_"): module}, {module: source})
    importlib.invalidate_caches()
    monkeypatch.setenv(plugins.LOAD_ENV, ",".join(EXITING))
    plugins.load_plugins(reload=True)
    yield
    for module, _ in EXITING.values():
        sys.modules.pop(module, None)


def test_a_plugin_that_calls_sys_exit_is_a_named_failure_not_the_end_of_the_program(exiting, capsys):
    """sys.exit(0) in a plugin made `kdinpaint inpaint` exit 0 with no output; now it is a broken plugin, named."""
    from kdinpaint.cli import main

    assert "tiny-unet" in {a.name for a in plugins.list_adapters()}  # the built-ins still load
    failures = {f.distribution: f.error for f in plugins.plugin_failures()}
    assert set(failures) == set(EXITING)
    assert failures["kdinpaint-exits-at-import"].startswith("SystemExit(0): the plugin called sys.exit()")
    assert failures["kdinpaint-exits-in-hook"].startswith("register_adapters raised SystemExit(3)")
    assert main(["adapters", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {f["distribution"] for f in listed["failures"]} == set(EXITING) and listed["adapters"]
    assert main(["--strict-plugins", "adapters"]) != 0
    err = capsys.readouterr().err
    assert "kdinpaint-exits-at-import 2.0" in err and "SystemExit(0)" in err
    with pytest.raises(plugins.PluginError, match="kdinpaint-exits-at-import 2.0: SystemExit"):
        plugins.load_plugins(strict=True)


def test_a_target_module_that_calls_sys_exit_is_refused_naming_it(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"'exits_on_import:Net': importing module 'exits_on_import' called sys.exit\(0\)"):
        plugins.import_target("exits_on_import:Net")
    sys.modules.pop("exits_on_import", None)


def test_load_restriction_env_var(dists, monkeypatch):
    reload(monkeypatch, **{plugins.LOAD_ENV: ""})  # no third-party plugin; the built-ins still load
    builtins = {a.name for a in plugins.list_adapters()}
    assert "tiny-unet" in builtins and all(a.distribution == "kdinpaint" for a in plugins.list_adapters())
    assert plugins.plugin_failures() == []
    reload(monkeypatch, **{plugins.LOAD_ENV: "kdinpaint-toy-resnet"})
    assert {a.name for a in plugins.list_adapters()} == builtins | {"toy-resnet"}
    assert plugins.plugin_failures() == []
    reload(monkeypatch, **{plugins.LOAD_ENV: "typo_hook, kdinpaint_toy_resnet"})  # entry-point names, _ or -
    assert {f.distribution for f in plugins.plugin_failures()} == {"kdinpaint-typo-hook"}


def test_duplicate_name_names_both_providers(dists, temporary_plugin, tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    make_dist(
        clone, "kdinpaint-clone", "2.0", {"clone": "kdp_clone"},
        {"kdp_clone": """
            from kdinpaint.hookspecs import hookimpl
            from kdinpaint_toy_resnet import ToyResNetInpainter, SPEC
            from kdinpaint.adapter import Adapter

            @hookimpl
            def register_adapters(register):
                register(Adapter(name="toy-resnet", spec=SPEC, build_student=ToyResNetInpainter))
        """},
    )
    monkeypatch.syspath_prepend(str(clone))
    importlib.invalidate_caches()
    reload(monkeypatch, **{plugins.LOAD_ENV: "kdinpaint-toy-resnet,kdinpaint-clone"})
    try:
        found = [a for a in plugins.list_adapters() if a.name == "toy-resnet"]
        assert sorted(a.distribution for a in found) == ["kdinpaint-clone", "kdinpaint-toy-resnet"]
        with pytest.raises(ValueError, match=r"registered twice.*kdinpaint-(toy-resnet 0\.1\.0|clone 2\.0) and "
                                             r"kdinpaint-(toy-resnet 0\.1\.0|clone 2\.0)"):
            plugins.get_adapter("toy-resnet")
        assert any("duplicate name 'toy-resnet'" in f.error for f in plugins.plugin_failures())
        with pytest.raises(plugins.PluginError, match="duplicate"):
            plugins.list_adapters(strict=True)
        # a plugin object registered at run time clashing with a built-in
        temporary_plugin("my-dup", register_adapters=lambda register: register(
            Adapter(name="tiny-unet", spec={"encoder_levels": ["enc1"]}, build_student=torch.nn.Identity)))
        with pytest.raises(ValueError, match="'tiny-unet' is registered twice, by kdinpaint 0.1.0 and my-dup"):
            plugins.get_adapter("tiny-unet")
    finally:
        sys.modules.pop("kdp_clone", None)


def test_unknown_and_bad_names():
    plugins.load_plugins(reload=True)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'.*known adapters: \[.*'tiny-unet'"):
        plugins.get_adapter("nope")
    with pytest.raises(ValueError, match="load_spec"):
        plugins.get_adapter("tiny-unet:no-cb")
    with pytest.raises(TypeError, match="string"):
        plugins.get_adapter(3)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        kdinpaint.load_spec("nope:variant")
    assert kdinpaint.load_spec("tiny-unet:no-cb").sites == []


def test_hook_register_mask_generators(temporary_plugin):
    class Quarter:
        """A mask source (kdinpaint.data.generators' contract): the top-left quarter, shifted by rng."""

        def __init__(self, shift: int = 0):
            self.shift = shift

        def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
            hole = np.zeros(size, dtype=bool)
            hole[self.shift : size[0] // 2 + self.shift, : size[1] // 2] = True
            return hole

    temporary_plugin("masks-test", register_mask_generators=lambda register: register("quarter", Quarter))
    assert plugins.get_mask_generator("quarter") is Quarter
    assert plugins.list_mask_generators()["quarter"] is Quarter
    source = plugins.get_mask_generator("quarter")(shift=1)
    assert source.sample(np.random.default_rng(0), (8, 8)).sum() == 16 and source.sample(None, (8, 8))[0].sum() == 0
    plugins.pm.unregister(name="masks-test")
    with pytest.raises(ValueError, match="unknown mask generator 'quarter'"):
        plugins.get_mask_generator("quarter")


def test_hook_register_losses(temporary_plugin):
    def l1(a, b):
        """|a - b| averaged."""
        return (a - b).abs().mean()

    temporary_plugin("losses-test", register_losses=lambda register: (register("l1-test", l1), register("bad", 3)))
    # register("bad", 3) raised inside the hook: the plugin's losses are dropped and the failure named
    assert "l1-test" not in plugins.list_losses()
    assert any(f.distribution == "losses-test" and "callable" in f.error for f in plugins.plugin_failures())
    temporary_plugin("losses-ok", register_losses=lambda register: register("l1-test", l1))
    assert plugins.get_loss("l1-test")(torch.ones(3), torch.zeros(3)) == 1


def test_every_hookspec_has_a_test_and_is_documented():
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "kdinpaint_spec")]
    assert len(specs) >= 3 and all(getattr(plugins.pm.hook, name).has_spec() for name in specs)
    tests = {name for name in globals() if name.startswith("test_hook_")}
    readme = (ROOT / "README.md").read_text()
    for name in specs:
        assert any(t.startswith(f"test_hook_{name}") for t in tests), f"hook {name} has no test_hook_{name}"
        assert f"`{name}" in readme, f"hook {name} is not documented in README.md"
    for env in (plugins.LOAD_ENV, plugins.STRICT_ENV):
        assert env in readme, f"{env} is not documented in README.md"
