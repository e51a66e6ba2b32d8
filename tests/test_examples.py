"""The examples run as documented: attach_your_model.py trains with falling losses; the plugin package installs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from kdinpaint import plugins
from kdinpaint.suggest import suggest_spec
from tiny import batch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "attach_your_model.py"
PLUGIN_DIR = ROOT / "examples" / "plugin-adapter"


def load_example():
    spec = importlib.util.spec_from_file_location("attach_your_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_hand_written_spec_is_what_suggest_proposes():
    example = load_example()
    assert suggest_spec(example.MyUNet(), batch(1, 32)).encoder_levels == example.SPEC["encoder_levels"]


@pytest.mark.slow
def test_attach_your_model_runs_with_falling_losses():
    # one thread: tiny tensors gain nothing from more, and spinning threads stall on a busy machine
    env = {**os.environ, "KDINPAINT_EXAMPLE_STEPS": "20", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--size", "32"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start, end = (float(x) for x in lines[0].split(":")[1].split("->"))
    assert end < start  # the teacher's L1 pre-training
    header = lines.index(next(line for line in lines if line.split()[:2] == ["step", "L1"]))
    rows = [[float(x) for x in line.split()] for line in lines[header + 1 :] if line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [10, 20]
    first, last = rows[0], rows[-1]
    assert last[1] < first[1] and last[4] < first[4]  # L1 and the total fall
    assert lines[-1].startswith("done; detached MyUNet")


@pytest.mark.slow
def test_compression_example_runs_end_to_end():
    """examples/compress_teacher.py: a reference network teaches tiny-unet; the output term falls and the
    exported student reloads identically."""
    env = {**os.environ, "KDINPAINT_EXAMPLE_STEPS": "40", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "compress_teacher.py"), "--size", "32"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("teacher reference:net4")
    header = lines.index(next(line for line in lines if line.split()[:2] == ["step", "L1"]))
    rows = [[float(x) for x in line.split()] for line in lines[header + 1 :] if line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [20, 40]
    assert rows[-1][4] < rows[0][4] and rows[-1][1] < rows[0][1]  # output term and L1 fall
    assert lines[-1].startswith("student tiny-unet") and lines[-1].endswith("reloaded export identical: True")


@pytest.mark.slow
def test_plugin_package_installs_and_registers(tmp_path, monkeypatch):
    """pip-install the example plugin into a target folder (no index, no build isolation) and load it."""
    pytest.importorskip("setuptools")
    source = tmp_path / "plugin-adapter"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"pip could not build the plugin offline here: {proc.stderr[-500:]}")
    declared = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]["entry-points"]["kdinpaint"]
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.setenv(plugins.LOAD_ENV, "kdinpaint-toy-resnet")
    installed = [ep for ep in metadata.entry_points(group="kdinpaint") if ep.dist.name == "kdinpaint-toy-resnet"]
    assert {ep.name: ep.value for ep in installed} == declared
    try:
        plugins.load_plugins(reload=True)
        toy = plugins.get_adapter("toy-resnet")
        assert Path(sys.modules["kdinpaint_toy_resnet"].__file__).is_relative_to(target)
        assert (toy.distribution, toy.version) == ("kdinpaint-toy-resnet", "0.1.0")
    finally:
        monkeypatch.undo()
        sys.modules.pop("kdinpaint_toy_resnet", None)
        plugins.load_plugins(reload=True)
