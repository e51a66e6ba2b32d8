"""recipes/ablation.py: the statistics on hand-computed seeds, the command line, and the harness with a fake runner
(report.json files written by the test, no training)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("kdinpaint_ablation", ROOT / "recipes" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T_975_2 = 4.303  # Student's t, 0.975 quantile, 2 degrees of freedom (printed tables)
T_975_1 = 12.706


# ---- statistics ------------------------------------------------------------------------------------
def test_t_quantile_matches_the_printed_table(ablation):
    assert ablation.t_quantile(0.975, 2) == pytest.approx(T_975_2, abs=5e-4)
    assert ablation.t_quantile(0.975, 1) == pytest.approx(T_975_1, abs=5e-4)


def test_mean_and_sample_std(ablation):
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3
    mean, std = ablation.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(7 / 3))
    mean, std = ablation.mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_paired_difference_and_its_95_percent_interval(ablation):
    # differences 0.5, 0.6, 0.9: mean 2/3; deviations -1/6, -1/15, 7/30, squares 25/900 + 4/900 + 49/900 = 78/900,
    # variance 78/1800 = 13/300; half-width t_{0.975,2} * sd / sqrt(3) = 4.303 * sqrt(13) / 30
    d = ablation.paired_difference([27.0, 27.5, 28.3], [26.5, 26.9, 27.4])
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(2 / 3)
    assert d["std"] == pytest.approx(math.sqrt(13 / 300))
    assert d["half"] == pytest.approx(T_975_2 * math.sqrt(13 / 300) / math.sqrt(3), rel=2e-4)
    assert (d["lo"], d["hi"]) == pytest.approx((2 / 3 - d["half"], 2 / 3 + d["half"]))
    one = ablation.paired_difference([27.0], [26.0])
    assert one["mean"] == 1.0 and math.isnan(one["half"])
    with pytest.raises(ValueError, match="same length"):
        ablation.paired_difference([1.0, 2.0], [1.0])


# ---- command line ----------------------------------------------------------------------------------
def test_an_unknown_variant_is_refused_with_the_valid_ones(ablation, capsys, tmp_path):
    with pytest.raises(SystemExit):
        ablation.main(["--variants", "baseline", "net9", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "net9" in err
    for name in ["baseline", *(f"net{i}" for i in range(1, 9))]:
        assert repr(name) in err


@pytest.mark.parametrize("argv, message", [
    (["--variants", "baseline", "net4", "net8", "train.seed=1"], "use --seeds"),  # once taken for a variant name
    (["--seeds", "0", "train.seed=3"], "use --seeds"),
    (["model.adapter=reference:net8"], "use --variants"),
    (["steps=5"], "section.key=value"),
    (["train.stepz=5"], "train.stepz"),  # unknown recipe keys fail before any run
    (["--seeds", "0", "0"], "twice"),
])
def test_bad_overrides_are_refused_before_any_run(ablation, monkeypatch, capsys, tmp_path, argv, message):
    monkeypatch.setattr(ablation, "run_training", lambda cmd, env: pytest.fail("no run should start"))
    with pytest.raises(SystemExit):
        ablation.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_overrides_may_follow_a_list_option(ablation):
    options, overrides = ablation.split_overrides(["--seeds", "0", "1", "data.size=128", "model.kwargs={width: 32}", "--reuse"])
    assert options == ["--seeds", "0", "1", "--reuse"]
    assert overrides == ["data.size=128", "model.kwargs={width: 32}"]


# ---- the harness with a fake runner ----------------------------------------------------------------
BUCKETS = ("10-20%", "20-30%", "30-40%", "40-50%", "all")
# PSNR of every (variant, seed): net8 - baseline = 0.5, 0.6, 0.9 over seeds 0, 1, 2 (the hand-computed case above)
PSNR = {"baseline": [26.5, 26.9, 27.4], "net4": [26.8, 27.0, 27.1], "net8": [27.0, 27.5, 28.3]}
SSIM = {"baseline": [0.80, 0.81, 0.82], "net4": [0.81, 0.81, 0.83], "net8": [0.82, 0.84, 0.83]}
FLOOR = {"biharmonic": (26.0, 0.79), "mean": (22.0, 0.70)}


def _summary(psnr: float, ssim: float) -> dict:
    # the 30-40 % bucket scores one dB and 0.01 lower than "all" in these fake reports
    table = {b: {"count": 2, "psnr": psnr - (1.0 if b == "30-40%" else 0.0), "ssim": ssim - (0.01 if b == "30-40%" else 0.0),
                 "l1": 0.02} for b in BUCKETS}
    table["all"]["count"] = 8
    return {"convention": "default", "buckets": table}


class FakeRunner:
    """Writes what recipes/train.py would: report.json (with the floor and rows) and a teacher when it trains one."""

    def __init__(self, diverge: tuple[str, int] | None = None, same_as: dict[str, str] | None = None):
        self.calls: list[tuple[list[str], dict]] = []
        self.diverge = diverge
        self.same_as = same_as or {}  # variants without scores of their own report those of another

    def __call__(self, cmd: list[str], env: dict) -> int:
        self.calls.append((cmd, env))
        opts = dict(a.split("=", 1) for a in cmd if "=" in a)
        variant, seed, run = opts["model.adapter"].split(":")[1], int(opts["train.seed"]), Path(opts["checkpoint.dir"])
        run.mkdir(parents=True)
        if (variant, seed) == self.diverge:
            (run / "report.json").write_text(json.dumps({"diverged": True, "step": 4}))
            return 2
        if variant != "baseline":  # the teacher it trained, or the shared one train.py copies in
            shared = opts.get("teacher.weights")
            (run / "teacher.safetensors").write_text(Path(shared).read_text() if shared else f"teacher of {variant} seed {seed}")
        scored = self.same_as.get(variant, variant)
        report = _summary(PSNR[scored][seed], SSIM[scored][seed])
        report["rows"] = [{"name": f"eval_{i}", "mask_ratio": 0.1 * i} for i in range(8)]
        report["floor"] = {"reference": "biharmonic", "methods": {m: _summary(*v) for m, v in FLOOR.items()}}
        (run / "report.json").write_text(json.dumps(report))
        return 0


def _main(ablation, tmp_path, *extra):
    results = tmp_path / "results.md"
    ablation.main(["--variants", "baseline", "net4", "net8", "--seeds", "0", "1", "2", "--threads", "3",
                   "--out", str(tmp_path / "runs"), "--results", str(results), *extra, "train.steps=4"])
    return results.read_text()


def _row(text: str, first_cell: str) -> list[str]:
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |")).strip("|").split(" | ")


def test_every_variant_and_seed_trains_once_with_its_seed_threads_and_folder(ablation, monkeypatch, tmp_path):
    runner = FakeRunner()
    monkeypatch.setattr(ablation, "run_training", runner)
    _main(ablation, tmp_path, "--device", "cpu", "--mixed-precision", "bf16")
    seen = []
    for cmd, env in runner.calls:
        opts = dict(a.split("=", 1) for a in cmd if "=" in a)
        variant, seed = opts["model.adapter"].split(":")[1], int(opts["train.seed"])
        seen.append((variant, seed))
        assert opts["checkpoint.dir"] == str(tmp_path / "runs" / variant / f"seed{seed}")
        assert opts["train.steps"] == "4" and opts["train.mixed_precision"] == "bf16"
        assert env["OMP_NUM_THREADS"] == "3" and env["ACCELERATE_USE_CPU"] == "true"
        assert opts["train.threads"] == "null"  # the recipe's train.threads would override --threads
        assert (opts.get("train.control") == "false") == (variant == "baseline")  # a twin of nothing is refused
    assert seen == [(v, s) for s in (0, 1, 2) for v in ("baseline", "net4", "net8")]  # one at a time, seed by seed


def test_teachers_are_shared_only_within_a_seed_and_an_architecture(ablation, monkeypatch, tmp_path):
    runner = FakeRunner(same_as={"net3": "net4", "net7": "net8"})
    monkeypatch.setattr(ablation, "run_training", runner)
    ablation.main(["--variants", "net3", "net4", "net7", "net8", "--seeds", "0", "1", "--out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "r.md")])
    shared = {}
    for cmd, _ in runner.calls:
        opts = dict(a.split("=", 1) for a in cmd if "=" in a)
        shared[(opts["model.adapter"].split(":")[1], int(opts["train.seed"]))] = opts.get("teacher.weights")
    assert shared[("net3", 0)] is None and shared[("net7", 0)] is None  # the first of each architecture trains one
    for seed in (0, 1):
        assert Path(shared[("net4", seed)]).read_text() == f"teacher of net3 seed {seed}"
        assert Path(shared[("net8", seed)]).read_text() == f"teacher of net7 seed {seed}"


def test_results_hold_the_table_the_paired_intervals_the_floor_and_the_machine(ablation, monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "run_training", FakeRunner())
    text = _main(ablation, tmp_path)
    assert "python recipes/ablation.py --variants baseline net4 net8 --seeds 0 1 2 --threads 3" in text
    assert "train.steps=4" in text and "machine:" in text and "torch" in text and "CPU cores" in text
    assert "total wall time" in text and "date:" in text and "scipy.stats.t.ppf" in text

    row = _row(text, "net8")  # variant, seeds, PSNR all, SSIM all, PSNR 30-40%, SSIM 30-40%, gap PSNR, gap SSIM, wall
    mean, std = sum(PSNR["net8"]) / 3, math.sqrt(sum((x - sum(PSNR["net8"]) / 3) ** 2 for x in PSNR["net8"]) / 2)
    assert row[1] == "3"
    assert row[2] == f"{mean:.2f} ± {std:.2f}"
    assert row[4] == f"{mean - 1:.2f} ± {std:.2f}"  # the 30-40 % bucket
    assert row[6] == f"{mean - FLOOR['biharmonic'][0]:+.2f} ± {std:.2f}"
    ssim_mean = sum(SSIM["net8"]) / 3
    assert row[3].startswith(f"{ssim_mean:.3f} ± ")
    assert _row(text, "biharmonic (floor, no weights)")[2] == "26.00"
    assert _row(text, "mean (floor, no weights)")[2:4] == ["22.00", "0.700"]

    # net8 - baseline: the hand-computed case, mean 2/3 and half-width 4.303 * sqrt(13) / 30
    paired = [ln for ln in text.splitlines() if ln.startswith("| net8 | 3 | +")][0].strip("|").split(" | ")
    half = T_975_2 * math.sqrt(13) / 30
    assert paired[2] == f"{2 / 3:+.2f} [{2 / 3 - half:+.2f}, {2 / 3 + half:+.2f}]"
    assert paired[4] == paired[2]  # the same differences in the 30-40 % bucket


def test_reuse_keeps_finished_runs_and_their_wall_times(ablation, monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "run_training", FakeRunner())
    first = _main(ablation, tmp_path)
    monkeypatch.setattr(ablation, "run_training", lambda cmd, env: pytest.fail("a finished run was trained again"))
    again = _main(ablation, tmp_path, "--reuse")
    assert _row(again, "net8")[:8] == _row(first, "net8")[:8]
    assert again.count("| reused |") == 9


def test_a_diverged_run_is_counted_apart_and_a_failed_one_stops(ablation, monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "run_training", FakeRunner(diverge=("net8", 2)))
    text = _main(ablation, tmp_path)
    assert _row(text, "net8")[1] == "2 (1 diverged)"
    paired = [ln for ln in text.splitlines() if ln.startswith("| net8 | 2 | +")]
    assert paired, "the paired difference uses the two seeds where both runs finished"
    monkeypatch.setattr(ablation, "run_training", lambda cmd, env: 1)
    with pytest.raises(SystemExit, match="exit status 1"):
        _main(ablation, tmp_path / "again")


def test_perceptual_scores_of_the_runs_get_their_own_table(ablation):
    def report(lpips, fid):
        scores = {"reference:net3": {"lpips": {"buckets": {"all": {"mean": lpips}}}, "fid": fid},
                  "biharmonic": {"lpips": {"buckets": {"all": {"mean": 9.0}}}, "fid": 99.0}}
        return {"report": {"perceptual": scores}, "wall_s": 1.0, "reused": False}

    runs = {("net3", 0): report(0.10, 20.0), ("net3", 1): report(0.20, 30.0)}
    lines = ablation.perceptual_lines(runs, ["net3"], [0, 1])
    # mean 0.15 and 25.0, sample deviations 0.0707 and 7.07; biharmonic's own scores are not the network's
    assert lines[-1] == "| net3 | 0.1500 ± 0.0707 | 25.00 ± 7.07 |"
    assert ablation.perceptual_lines({("net3", 0): {"report": {}, "wall_s": 1.0}}, ["net3"], [0]) == []
