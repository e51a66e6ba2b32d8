"""recipes/study.py: the paired gaps and their pooled intervals from hand-made report.json files (hand-computed
against Student's t from a printed table), the markdown rows, the bucket filter, the results section, and the
scheduling (dependencies first, finished runs skipped on a second call) with a fake process instead of training."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
T_975_2 = 4.303  # Student's t, 0.975 quantile, 2 degrees of freedom
T_975_1 = 12.706  # ... 1 degree of freedom


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("kdinpaint_study", ROOT / "recipes" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def rows(psnr, ssim=None, ratios=(0.15, 0.35, 0.45)):
    ssim = ssim or [0.8] * len(psnr)
    return [{"name": f"eval_{i}", "mask_ratio": r, "psnr": p, "ssim": s, "l1": 0.0, "convention": "default"}
            for i, (p, s, r) in enumerate(zip(psnr, ssim, ratios))]


def report(student, control, biharmonic):
    return {"rows": rows(student), "control": {"rows": rows(control)},
            "floor": {"methods": {"biharmonic": {"rows": rows(biharmonic)}}}}


# seed 0: student - twin per image = 0.5, 1.0, 1.5; seed 1: 0.5, 2.0, 0.5. Averaged over the seeds per image:
# 0.5, 1.5, 1.0, mean 1.0, deviations -0.5, +0.5, 0, sample variance 0.5 / 2 = 0.25, standard error 0.5 / sqrt(3),
# half-width 4.303 * 0.5 / sqrt(3) = 1.2422: the interval [-0.24, +2.24], "level".
SEED0 = report([20.5, 22.0, 18.5], [20.0, 21.0, 17.0], [21.0, 23.0, 19.0])
SEED1 = report([21.0, 23.0, 17.5], [20.5, 21.0, 17.0], [21.0, 23.0, 19.0])


def test_pooled_gap_over_seeds_matches_the_hand_computation(study):
    per_seed = [study.image_gaps(study.network_rows(r, "student"), study.network_rows(r, "control"), "psnr")
                for r in (SEED0, SEED1)]
    assert per_seed == [pytest.approx([0.5, 1.0, 1.5]), pytest.approx([0.5, 2.0, 0.5])]
    p = study.pooled(per_seed)
    half = T_975_2 * 0.5 / math.sqrt(3)
    assert p["gap"] == pytest.approx(1.0)
    assert p["se"] == pytest.approx(0.5 / math.sqrt(3))
    assert (p["lo"], p["hi"]) == pytest.approx((1.0 - half, 1.0 + half), abs=2e-4)
    assert p["seeds"] == pytest.approx([1.0, 1.0]) and p["n"] == 2
    assert study.verdict(p) == "level"
    assert study.verdict({"gap": 1.0, "lo": 0.1, "hi": 2.0}) == "**above**"
    assert study.verdict({"gap": -1.0, "lo": -2.0, "hi": -0.1}) == "below"


def test_interval_over_seeds(study):
    # 1.0, 2.0, 4.0: mean 7/3, sample sd sqrt(7/3), half-width 4.303 * sqrt(7/3) / sqrt(3)
    s = study.seed_interval([1.0, 2.0, 4.0])
    half = T_975_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert s["gap"] == pytest.approx(7 / 3)
    assert (s["lo"], s["hi"]) == pytest.approx((7 / 3 - half, 7 / 3 + half), abs=1e-3)
    one = study.seed_interval([0.5])
    assert one["gap"] == 0.5 and math.isnan(one["lo"])


def test_control_table_row(study):
    table = study.control_table({("net3", 0): SEED0, ("net3", 1): SEED1}, ["net3", "net4"])
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, net3 (net4 has no run)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # student PSNR: mean of the per-image means (20.333 and 20.5) = 20.42; twin (19.333, 19.5) = 19.42
    assert cells[:4] == ["net3", "2", "20.42", "19.42"]
    assert cells[4] == "+1.00 [-0.24, +2.24]" and cells[5] == "+1.00 / +1.00"
    assert cells[6] == "+1.00 [+1.00, +1.00]"  # both seeds' mean gaps are 1.0: no spread over seeds
    assert cells[7] == "level / **above**"
    assert cells[8] == "+0.0000 [+0.0000, +0.0000]"  # SSIM equal everywhere: a zero gap with no spread
    # 30-40 % holds image 1 only: gaps 1.0 and 2.0, one image, no interval
    assert cells[9] == "+1.50"
    # student - biharmonic: seed 0 (-0.5, -1.0, -0.5), seed 1 (0, 0, -1.5): per image -0.25, -0.5, -1.0, mean -0.5833
    sd = math.sqrt(((-0.25 + 7 / 12) ** 2 + (-0.5 + 7 / 12) ** 2 + (-1.0 + 7 / 12) ** 2) / 2)
    lo, hi = -7 / 12 - T_975_2 * sd / math.sqrt(3), -7 / 12 + T_975_2 * sd / math.sqrt(3)
    assert cells[10] == f"-0.58 [{lo:+.2f}, {hi:+.2f}]"


def test_versus_table_pairs_the_same_seed(study):
    base0, base1 = report([20.0, 21.0, 18.0], [0, 0, 0], [21.0, 23.0, 19.0]), report([20.0, 21.0, 18.0], [0, 0, 0], [21.0, 23.0, 19.0])
    del base0["control"], base1["control"]
    runs = {("baseline", 0): base0, ("baseline", 1): base1, ("net3", 0): SEED0, ("net3", 1): SEED1}
    lines = study.versus_table(runs, ["baseline", "net3"], "baseline").splitlines()
    net3 = [c.strip() for c in lines[2].strip("|").split("|")]
    # seed 0: 0.5, 1.0, 0.5; seed 1: 1.0, 2.0, -0.5; per image 0.75, 1.5, 0.0, mean 0.75, sd 0.75
    half = T_975_2 * 0.75 / math.sqrt(3)
    assert net3[:4] == ["net3", "2", f"+0.75 [{0.75 - half:+.2f}, {0.75 + half:+.2f}]", "+0.67 / +0.83"]
    # over the seeds: 2/3 and 5/6, mean 0.75, sd sqrt(2) / 12, half-width t_{0.975,1} * sd / sqrt(2) = 12.706 / 12
    assert net3[4] == f"+0.75 [{0.75 - T_975_1 / 12:+.2f}, {0.75 + T_975_1 / 12:+.2f}]"
    twin = [c.strip() for c in lines[3].strip("|").split("|")]
    assert twin[0] == "net3 twin" and twin[2].startswith("-0.25 [")  # 0, 0, -1 and 0.5, 0, -1: per image 0.25, 0, -1
    assert lines[-1].startswith("| (baseline − biharmonic) | 2 | -1.33")


def test_rows_of_other_images_are_refused(study):
    other = rows([1.0, 2.0, 3.0])
    other[1]["name"] = "eval_9"
    with pytest.raises(ValueError, match="different images"):
        study.image_gaps(rows([1.0, 2.0, 3.0]), other, "psnr")


def test_bucket_filter_and_missing_psnr(study):
    a, b = rows([30.0, None, 10.0]), rows([29.0, 20.0, 9.0])  # None: an image filled exactly (infinite PSNR)
    assert study.image_gaps(a, b, "psnr", "30-40%") == [pytest.approx(math.nan, nan_ok=True)]
    assert study.image_gaps(a, b, "psnr", "40-50%") == [1.0]
    p = study.pooled([study.image_gaps(a, b, "psnr")])
    assert p["gap"] == 1.0 and p["seeds"] == [1.0]  # the non-finite image is left out


def test_curves_average_the_seeds(study):
    metrics = {("net3", 0): [{"step": 10, "eval/psnr": 20.0, "eval/control/psnr": 19.0}],
               ("net3", 1): [{"step": 10, "eval/psnr": 21.0, "eval/control/psnr": 18.0},
                             {"step": 20, "eval/psnr": 22.0, "eval/control/psnr": 19.5}]}
    lines = study.curves(metrics, ["net3"]).splitlines()
    assert lines[0] == "| step | net3 | net3 twin |"
    assert lines[2] == "| 10 | 20.50 | 18.50 |" and lines[3] == "| 20 | 22.00 | 19.50 |"


def test_results_section_is_replaced_in_place(study, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Findings\n\nkept text\n")
    study.write_section(doc, "paper32", "first table")
    study.write_section(doc, "other", "another")
    study.write_section(doc, "paper32", "second table")
    text = doc.read_text()
    assert text.startswith("# Findings\n\nkept text\n")
    assert "first table" not in text and text.count("<!-- study:paper32 -->") == 1
    assert text.index("second table") < text.index("another")


class FakeRun:
    """Stands for a training process: writes what the Trainer would (report.json, or a teacher) and exits 0."""

    started: list = []

    def __init__(self, cmd, env=None, stdout=None, stderr=None, cwd=None):
        run = Path(next(a for a in cmd if a.startswith("checkpoint.dir=")).split("=", 1)[1])
        stage = cmd[cmd.index("--stage") + 1]
        FakeRun.started.append((run.parent.name, [a for a in cmd if a.startswith("teacher.weights=")]))
        if stage == "teacher":
            (run / "teacher.safetensors").write_text("")
        else:
            (run / "report.json").write_text(json.dumps(SEED0))
        self.returncode = 0

    def poll(self):
        return 0


def test_runs_start_after_their_teacher_and_finished_runs_are_skipped(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    s = study.Study(title="t", config="recipes/demo.yaml", common=(), arms=(
        study.Arm("net3", ("teacher.weights={teacher}/teacher.safetensors",), control=True),
        study.Arm("teacher", stage="teacher"),
        study.Arm("baseline"),
    ))
    args = type("A", (), {"seeds": [0, 1], "jobs": 2, "threads": 1})()
    FakeRun.started = []
    study.train_all(s, tmp_path, args, [], {})
    order = [name for name, _ in FakeRun.started]
    assert sorted(order) == ["baseline", "baseline", "net3", "net3", "teacher", "teacher"]
    for seed in (0, 1):  # each net3 after the teacher of its seed, and taught by that teacher
        assert order.index("teacher") < order.index("net3")
    taught = [w for name, w in FakeRun.started if name == "net3"]
    assert sorted(w[0] for w in taught) == [f"teacher.weights={tmp_path / 'teacher' / f'seed{k}'}/teacher.safetensors" for k in (0, 1)]
    FakeRun.started = []
    study.train_all(s, tmp_path, args, [], {})  # everything is done: nothing starts again
    assert FakeRun.started == []
    (tmp_path / "net3" / "seed1" / "report.json").unlink()  # a run cut off before its report
    study.train_all(s, tmp_path, args, [], {})
    assert [name for name, _ in FakeRun.started] == ["net3"]


def test_chosen_arms_bring_what_they_need(study):
    s = study.Study(title="t", config="recipes/demo.yaml", common=(), arms=(
        study.Arm("teacher", stage="teacher"), study.Arm("net3", ("teacher.weights={teacher}/teacher.safetensors",)),
        study.Arm("baseline")))
    assert study.selected(s, ["net3"]) == {"net3", "teacher"}
    assert study.selected(s, None) == {"teacher", "net3", "baseline"}
    with pytest.raises(ValueError, match="net9"):
        study.selected(s, ["net9"])
