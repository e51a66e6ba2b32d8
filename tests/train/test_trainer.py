"""kdinpaint.train.Trainer: recipes load, overrides are checked, a killed run resumes to the same weights, two ranks."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import ROOT, TINY, train_child

from kdinpaint.train.recipe import Recipe, load_recipe
from kdinpaint.train.runs import cpu_threads, user_threads

TRAIN = ROOT / "recipes" / "train.py"


def _train(run_dir, *extra, check=True, launcher=(sys.executable,), script=None):
    kw = {"script": script} if script else {}
    return train_child(*TINY, f"checkpoint.dir={run_dir}", *extra, check=check, launcher=launcher, **kw)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    import kdinpaint

    name, _, variant = recipe.model.adapter.partition(":")
    adapter = kdinpaint.get_adapter(name)
    adapter.spec.variant(variant or None)  # the variant exists


def test_bad_recipes_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"optim.learning_rate.*valid keys of optim"):
        load_recipe(None, ["optim.learning_rate=1e-4"])
    with pytest.raises(TypeError, match="optim.batch_size must be int"):
        load_recipe(None, ["optim.batch_size=six"])
    with pytest.raises(ValueError, match="not one of"):
        load_recipe(None, ["meta.mode=reversehg"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_recipe(None, ["lr=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {lr: 1}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown recipe section\(s\) \['optimizer'\]"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_missing_data_path_is_named(tmp_path):
    proc = _train(tmp_path / "run", "data.images=/no/such/folder", check=False)
    assert proc.returncode != 0 and "data path '/no/such/folder' does not exist" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 3])  # meta.every=3: the Psi steps fall on blocks 1 and 4, across the resume
def test_killed_run_resumes_to_the_same_weights(tmp_path, every):
    steps = ["train.steps=8", "meta.steps=2", "checkpoint.every=4", f"meta.every={every}", f"train.control={every == 3}"]
    _train(tmp_path / "whole", *steps)
    killed = _train(tmp_path / "resumed", *steps, "--stop-after", "6", check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step_*")] == ["step_0000004"]
    assert not (tmp_path / "resumed" / "student.safetensors").exists()
    resumed = _train(tmp_path / "resumed", *steps)
    assert "resumed from" in resumed.stdout + resumed.stderr
    for name in ("student", "control") if every == 3 else ("student",):  # the twin resumes too
        a = load_file(str(tmp_path / "whole" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    log = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    report = (tmp_path / "whole" / "report.md").read_text()
    assert "| PSNR" in report and "10-20%" in report


@pytest.mark.slow
def test_eval_every_logs_the_exported_weights_without_changing_training(tmp_path):
    """log.eval_every: held-out scores in metrics.jsonl during training; the last one is the final report's
    (the same averaged weights, the same images and masks), and evaluating does not change what is trained."""
    steps = ["model.kwargs={width: 4, prefill: true}", "train.steps=8", "train.average=0.5"]
    _train(tmp_path / "plain", *steps)
    _train(tmp_path / "eval", *steps, "log.eval_every=4")
    records = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in records if "eval/psnr" in r]
    assert [r["step"] for r in scores] == [4, 8]
    final = json.loads((tmp_path / "eval" / "report.json").read_text())["buckets"]["all"]
    assert scores[-1]["eval/psnr"] == pytest.approx(final["psnr"], abs=1e-5)
    assert scores[-1]["eval/ssim"] == pytest.approx(final["ssim"], abs=1e-5)
    assert not any("eval/psnr" in json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())
    a = load_file(str(tmp_path / "plain" / "student.safetensors"))
    b = load_file(str(tmp_path / "eval" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_threads_share_the_cores_among_local_processes():
    assert cpu_threads(None, 1, cores=16) is None  # the launcher's setting stays
    assert cpu_threads(3, 4, cores=2) == 3  # a number is taken as given
    alone = lambda n: lambda: n  # noqa: E731 - runnable tasks: only the run's own processes
    assert [cpu_threads(0, n, cores=16, runnable=alone(n)) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    assert cpu_threads(0, 1, runnable=alone(1)) == len(os.sched_getaffinity(0))
    # other work holding cores: only the free ones are shared (spinning OpenMP threads on a busy core: 3-5x slower)
    assert cpu_threads(0, 1, cores=2, runnable=alone(2)) == 1  # one other process on a 2-core machine
    assert cpu_threads(0, 2, cores=16, runnable=alone(8)) == 5  # 6 others: 10 free cores for 2 processes
    assert cpu_threads(0, 1, cores=2, runnable=alone(9)) == 1  # never fewer than one


def test_runnable_tasks_reads_the_running_count(tmp_path, monkeypatch):
    from kdinpaint.train import runs

    samples = iter(["0.50 0.40 0.30 3/120 999\n", "0.50 0.40 0.30 1/120 999\n", "0.50 0.40 0.30 2/120 999\n"])
    monkeypatch.setattr(runs.Path, "read_text", lambda self: next(samples))
    assert runs.runnable_tasks(samples=3, interval=0) == 2  # the median of 3, 1, 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to change the thread count")
def test_free_cores_are_counted_again_during_the_run(tmp_path, monkeypatch, capsys):
    # train.threads: 0 on one process: every RETHREAD_EVERY blocks the threads follow the cores free then
    from training_helpers import train_here

    from kdinpaint.train import runs, trainer

    cores = len(os.sched_getaffinity(0))
    counts = iter([1, cores + 1, 1])  # alone at the start, then `cores` other tasks, then alone again
    seen = []

    def runnable() -> int:
        value = next(counts, 1)
        seen.append(value)
        return value

    monkeypatch.setattr(runs, "runnable_tasks", runnable)
    monkeypatch.setattr(trainer, "RETHREAD_EVERY", 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        code = train_here(*TINY, "train.steps=6", "meta.steps=2", "train.threads=0", f"checkpoint.dir={tmp_path / 'r'}")
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    assert code == 0
    assert seen[:3] == [1, cores + 1, 1]
    assert f"{cores} threads: train.threads: 0, the cores free at the start" in out.out + out.err
    assert f"threads: {cores} -> 1 (train.threads: 0, the cores free now)" in out.out + out.err
    assert f"threads: 1 -> {cores} (train.threads: 0, the cores free now)" in out.out + out.err


def test_an_omp_num_threads_of_the_user_wins_over_all_cores():
    assert user_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert user_threads({"OMP_NUM_THREADS": "1"}) == 1  # set by the user: a process that must stay on one core
    assert [user_threads(e) for e in ({}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "four"})] == [None] * 3
    under_accelerate = {"ACCELERATE_MIXED_PRECISION": "no"}  # accelerate launch exports OMP_NUM_THREADS=1 by itself
    assert user_threads({**under_accelerate, "OMP_NUM_THREADS": "1"}) is None
    assert user_threads({**under_accelerate, "OMP_NUM_THREADS": "2"}) == 2  # --num_cpu_threads_per_process 2


@pytest.mark.slow
def test_main_job_prints_its_threads(tmp_path):
    proc = _train(tmp_path / "t", "train.steps=2", "train.threads=1")
    assert "device cpu (1 thread: train.threads)," in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_processes_on_cpu(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531")
    proc = _train(tmp_path / "ddp", "train.steps=4", "train.control=true", launcher=launcher, script=TRAIN)  # the main job's entry
    out = proc.stdout + proc.stderr
    assert "world size 2" in out
    # the demo's train.threads: 0 shares the free cores between the ranks, unless the launcher set OMP_NUM_THREADS
    # (torchrun exports 1 for several processes)
    assert __import__("re").search(r"\(\d+ threads?: (train.threads: 0, the cores free at the start|OMP_NUM_THREADS=1 "
                                   r"in the environment, over train.threads: 0)\)", out)
    assert (tmp_path / "ddp" / "student.safetensors").is_file() and (tmp_path / "ddp" / "control.safetensors").is_file()
    assert "Did distillation help?" in (tmp_path / "ddp" / "report.md").read_text()


@pytest.mark.slow
def test_objective_from_a_registered_loss(tmp_path):
    """losses.objective swaps R_recon + R_style for an adapter's own objective (here EdgeConnect's)."""
    _train(tmp_path / "ec", "train.steps=2", "losses.objective=edgeconnect")
    first = json.loads((tmp_path / "ec" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 2 and first["loss_inp"] > 0
    proc = _train(tmp_path / "bad", "train.steps=2", "losses.objective=no-such-loss", check=False)
    assert proc.returncode != 0 and "no-such-loss" in proc.stderr and "edgeconnect" in proc.stderr


@pytest.mark.slow
def test_control_twin_trains_beside_the_student_without_changing_it(tmp_path):
    """train.control: the student's weights are those of a run without the twin; the twin is exported and
    report.json's paired gap is the per-image difference of the two networks' rows."""
    import numpy as np

    steps = ["model.kwargs={width: 4, prefill: true}", "train.steps=4", "train.average=0.5"]
    _train(tmp_path / "plain", *steps)
    _train(tmp_path / "twin", *steps, "train.control=true")
    a = load_file(str(tmp_path / "plain" / "student.safetensors"))
    b = load_file(str(tmp_path / "twin" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    control = load_file(str(tmp_path / "twin" / "control.safetensors"))
    assert control.keys() == a.keys() and any(not torch.equal(a[k], control[k]) for k in a)
    report = json.loads((tmp_path / "twin" / "report.json").read_text())
    d = np.array([s["psnr"] - c["psnr"] for s, c in zip(report["rows"], report["control"]["rows"])])
    gap = report["control"]["gap"]["all"]["psnr"]
    assert gap["gap"] == pytest.approx(d.mean()) and gap["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    md = (tmp_path / "twin" / "report.md").read_text()
    assert "## Did distillation help?" in md and report["control"]["verdict"] in md
    assert "## Perceptual (LPIPS, FID" in md  # scores with the backbone files, else the missing file named
    assert ("perceptual" in report) != ("LPIPS and FID not computed" in md)
    html = (tmp_path / "twin" / "report.html").read_text()
    assert "reference (control)" in html and html.count("data:image/png;base64,") >= 5  # input | net | floor | truth | control
    records = [json.loads(line) for line in (tmp_path / "twin" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["control/kd/total"] == 0 for r in records) and all(r["kd/total"] > 0 for r in records)


@pytest.mark.slow
def test_control_without_distillation_is_refused(tmp_path):
    proc = _train(tmp_path / "run", "train.steps=2", "train.control=true", "losses.lambda_d=0", check=False)
    assert proc.returncode == 1 and "nothing to compare" in proc.stderr and "losses.lambda_d is 0" in proc.stderr


def test_overrides_reach_into_mappings_and_duplicate_keys_are_refused(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["model.kwargs.prefill=true", "model.kwargs.extra.depth=2"])
    assert recipe.model.kwargs == {"width": 8, "prefill": True, "prefill_ramp": 8, "extra": {"depth": 2}}  # the rest stays
    with pytest.raises(ValueError, match="'train.steps' is not a mapping"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["train.steps.x=3"])
    twice = tmp_path / "twice.yaml"
    twice.write_text("optim: {lr: 0.1}\ntrain: {steps: 3}\noptim: {batch_size: 2}\n")
    with pytest.raises(ValueError, match=r"the key 'optim' appears twice \(lines 1 and 3\)"):
        load_recipe(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ValueError, match=r"the key 'lr' appears twice \(lines 2 and 3\)"):
        load_recipe(inner)
    listed = tmp_path / "list.yaml"
    listed.write_text("- optim\n- train\n")
    with pytest.raises(ValueError, match="is a YAML list, not a mapping of sections"):
        load_recipe(listed, ["train.steps=3"])


@pytest.mark.slow
def test_one_run_per_folder_and_no_mixing_with_a_finished_run_of_another_recipe(tmp_path):
    from kdinpaint.train.runs import RunLock

    run = tmp_path / "run"
    lock = RunLock(run).acquire()  # as a running training holds it
    try:
        proc = _train(run, "train.steps=2", check=False)
        assert proc.returncode == 1 and "is in use by process" in proc.stderr
    finally:
        lock.release()
    _train(run, "train.steps=2", "checkpoint.every=0")  # finished, no checkpoint kept
    proc = _train(run, "train.steps=2", "checkpoint.every=0", "teacher.lr=0.01", check=False)
    assert proc.returncode == 1 and "holds the outputs" in proc.stderr and "teacher.lr" in proc.stderr


@pytest.mark.slow
def test_a_random_teacher_is_refused(tmp_path):
    proc = _train(tmp_path / "run", "train.steps=2", "teacher.steps=0", check=False)
    assert proc.returncode == 1 and "teacher.steps is 0 and there is no teacher.weights" in proc.stderr


def test_a_network_by_import_path_needs_no_plugin(tmp_path):
    """model.target + model.spec: a class defined in a test module trains like an adapter."""
    from kdinpaint.train.runs import build_models

    spec = "{encoder_levels: [down1, down2, down3]}"
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["model.adapter=null", "model.target=tiny:TinyUNet",
                                                          "model.kwargs={width: 4}", f"model.spec={spec}", "model.stride=8"])
    adapter, variant, adapter_spec, student, teacher = build_models(recipe)
    assert type(student).__name__ == "TinyUNet" and adapter.stride == 8 and adapter_spec.encoder_levels == ["down1", "down2", "down3"]
    assert student is not teacher and recipe.model.name == "tiny:TinyUNet"
    with pytest.raises(ValueError, match="both name the network"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["model.target=tiny:TinyUNet", f"model.spec={spec}"])
    with pytest.raises(ValueError, match="model.spec goes with model.target"):
        load_recipe(None, [f"model.spec={spec}"])
    bad = load_recipe(None, ["model.target=tiny:NoSuchNet", f"model.spec={spec}"])
    with pytest.raises(ValueError, match="'tiny:NoSuchNet'.*has no 'NoSuchNet'"):
        build_models(bad)


def test_device_flag_of_kdinpaint_train(monkeypatch, capsys, tmp_path):
    from kdinpaint.cli import main as cli_main

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # restored after the test
    missing = str(tmp_path / "no-recipe.yaml")
    assert cli_main(["train", missing, "--device", "cpu"]) == 1  # the recipe is refused after the device is chosen
    assert os.environ["ACCELERATE_USE_CPU"] == "true"  # accelerate's switch: Accelerator() then takes the CPU
    if not torch.cuda.is_available():
        assert cli_main(["train", missing, "--device", "cuda"]) == 1
        assert "--device cuda, but torch.cuda.is_available() is False" in capsys.readouterr().err
