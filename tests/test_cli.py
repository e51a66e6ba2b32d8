"""The ``kdinpaint`` command line: adapters, spec show, spec suggest; broken plugins never break it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from kdinpaint import plugins
from kdinpaint.cli import main
from kdinpaint import load_spec
from kdinpaint.spec import AdapterSpec
from test_plugins import BROKEN, example_plugin_dist, make_dist
from tiny import LEVELS


@pytest.fixture
def clean_plugins(monkeypatch):
    monkeypatch.delenv(plugins.LOAD_ENV, raising=False)
    monkeypatch.delenv(plugins.STRICT_ENV, raising=False)
    plugins.load_plugins(reload=True)
    yield
    monkeypatch.undo()
    plugins.load_plugins(reload=True)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_adapters_table_and_json(clean_plugins, capsys):
    code, out, _ = run(capsys, "adapters")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "VARIANTS", "FROM", "DESCRIPTION"]
    tiny = plugins.get_adapter("tiny-unet")
    row = next(r for r in rows if r.startswith("tiny-unet "))
    assert "no-cb,no-self,wide" in row and f"kdinpaint {tiny.version}" in row and tiny.description in row

    code, out, _ = run(capsys, "adapters", "--json")
    data = json.loads(out)
    entry = next(a for a in data["adapters"] if a["name"] == "tiny-unet")
    assert entry == {"name": "tiny-unet", "variants": ["no-cb", "no-self", "wide"], "distribution": "kdinpaint",
                     "version": tiny.version, "description": tiny.description}
    assert data["failures"] == []


def test_spec_show_round_trips(clean_plugins, capsys, tmp_path):
    code, out, _ = run(capsys, "spec", "show", "tiny-unet:no-cb")
    assert code == 0 and out.startswith("# adapter tiny-unet from kdinpaint")
    shown = AdapterSpec.from_dict(yaml.safe_load(out))
    assert shown.to_dict() == load_spec("tiny-unet:no-cb").to_dict()
    assert shown.completion_sites == [] and shown.encoder_levels == ["enc1", "enc2", "enc3"]
    path = tmp_path / "spec.yaml"
    path.write_text(out)
    assert load_spec(str(path)).to_dict() == shown.to_dict()  # the printed YAML is a loadable spec file

    code, _, err = run(capsys, "spec", "show", "tiny-unet:nope")
    assert code == 1 and "no variant 'nope'" in err and "no-cb" in err
    code, _, err = run(capsys, "spec", "show", "no-such-net")
    assert code == 1 and "unknown adapter 'no-such-net'" in err and "tiny-unet" in err


def test_spec_suggest_for_adapter_and_factory(clean_plugins, capsys, tmp_path, monkeypatch):
    code, out, _ = run(capsys, "spec", "suggest", "tiny-unet")
    assert code == 0
    assert "# hand-written encoder_levels: ['enc1', 'enc2', 'enc3']" in out
    assert yaml.safe_load(out)["encoder_levels"] == ["enc1", "enc2", "enc3"]

    (tmp_path / "my_factory_mod.py").write_text(textwrap.dedent("""
        from tiny import TinyUNet

        def build():
            return TinyUNet(width=4)

        not_a_model = dict
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(capsys, "spec", "suggest", "--model", "my_factory_mod:build", "--shape", "1,3,32,32")
    assert code == 0
    spec = yaml.safe_load(out)
    assert spec["encoder_levels"] == LEVELS and spec["image_arg"] == "image" and spec["mask_arg"] == "mask"
    assert spec["probe_shape"] == [1, 3, 32, 32]
    assert "# level down1: 16x16" in out

    code, _, err = run(capsys, "spec", "suggest", "--model", "my_factory_mod:not_a_model")
    assert code == 1 and "not an nn.Module" in err
    code, _, err = run(capsys, "spec", "suggest", "--model", "my_factory_mod")
    assert code == 1 and "package.module:callable" in err
    code, _, err = run(capsys, "spec", "suggest", "--model", "my_factory_mod:build", "--shape", "1,3,32")
    assert code == 1 and "four positive ints" in err
    code, _, err = run(capsys, "spec", "suggest")
    assert code == 1 and "exactly one of" in err
    sys.modules.pop("my_factory_mod", None)


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_console_with_installed_plugins_and_broken_ones(tmp_path):
    """In a fresh interpreter: plugins load lazily, the example plugin is listed with its distribution and
    version, broken plugins are reported by distribution without breaking the command; strict mode fails."""
    site = tmp_path / "site"
    site.mkdir()
    src = example_plugin_dist(site)
    for dist, (module, source) in BROKEN.items():
        make_dist(site, dist, "1.0", {module.removeprefix("kdp_"): module}, {module: source})
    env = {k: v for k, v in os.environ.items() if k not in (plugins.LOAD_ENV, plugins.STRICT_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(src), env.get("PYTHONPATH", "")])
    script = textwrap.dedent("""
        import sys
        import kdinpaint, kdinpaint.plugins, kdinpaint.cli
        assert "kdinpaint_toy_resnet" not in sys.modules and "kdinpaint_adapters.tiny" not in sys.modules, "eager"
        sys.exit(kdinpaint.cli.main(["adapters", "--json"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = {a["name"]: a for a in data["adapters"]}
    assert rows["toy-resnet"]["distribution"] == "kdinpaint-toy-resnet" and rows["toy-resnet"]["version"] == "0.1.0"
    assert rows["toy-resnet"]["variants"] == ["no-cb"] and rows["tiny-unet"]["distribution"] == "kdinpaint"
    assert {f["distribution"] for f in data["failures"]} == set(BROKEN)

    strict = subprocess.run([sys.executable, "-m", "kdinpaint.cli", "--strict-plugins", "adapters"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1
    assert "kdinpaint-broken-import 1.0" in strict.stderr and "strict mode" in strict.stderr
