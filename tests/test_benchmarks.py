"""The benchmark scripts, run as users run them, on tiny IDX files and on the real MNIST sample."""

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "clustering.py"


def run_benchmark(config: str, data: list[str], cli_args: list[str], cwd: Path) -> list[str]:
    """Two seeds of one epoch each, with the run defaults (the script drops the checkpoints); the printed lines."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(CONFIGS / config), *data, "--epochs", "1", "--seeds", "0", "1", "--",
         "--trainer.logger=false", *cli_args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list(cwd.rglob("*.ckpt")), "the benchmark should write no checkpoints"
    return out.stdout.splitlines()


def test_clustering_benchmark_trains_once_per_seed_and_summarises_the_test_figures(fashion_dir, tmp_path):
    lines = run_benchmark("clustering_fashion.yaml", ["--data-dir", str(fashion_dir)], ["--data.val_size=100"], tmp_path)
    assert [line for line in lines if line.startswith("seed ")] == ["seed 0", "seed 1"]
    # time-to-quality: per seed, when the headline metric first reached each level
    reached = [line for line in lines if line.startswith("time to val/purity >= 0.7: ")]
    assert len(reached) == 2 and all(re.search(r">= 0.95: (\d+ s \(epoch 0\)|not reached)", line) for line in reached)
    tests = [dict(re.findall(r"(\w+)=([\d.]+)", line)) for line in lines if line.startswith("test purity")]
    assert len(tests) == 2
    sizes = [[int(n) for n in line.split(": ")[1].split()] for line in lines if line.startswith("test cluster sizes, largest first: ")]
    assert len(sizes) == 2 and all(s == sorted(s, reverse=True) and sum(s) == 200 for s in sizes)  # every test image of the fixture, once
    # which test clusters mix classes: each named with its main classes' counts, which leave 20% or
    # more of it to classes other than its largest
    mixing = [line.split("): ", 1)[1] for line in lines if line.startswith("test clusters mixing classes")]
    assert len(mixing) == 2
    for cell in (c for line in mixing if line != "none" for c in line.split("; ")):
        counts, size = re.fullmatch(r"\d+: ((?:\d+x\d+(?: \+ )?)+) of (\d+)", cell).groups()
        counts = [int(n) for n in re.findall(r"x(\d+)", counts)]
        assert counts == sorted(counts, reverse=True) and sum(counts) <= int(size) and counts[0] < 0.8 * int(size)
    # clusters each 80% one class or more would make purity 0.8 or more
    assert all(line != "none" for line, test in zip(mixing, tests) if float(test["purity"]) < 0.8)
    # different seeds, different initial weights: the two runs end apart
    assert tests[0]["recon_loss"] != tests[1]["recon_loss"]
    (summary,) = [line for line in lines if line.startswith("test over 2 seeds")]
    acc_mean, acc_std = map(float, re.search(r"acc=([\d.]+)\+-([\d.]+)", summary).groups())
    accs = [float(t["acc"]) for t in tests]
    assert abs(acc_mean - statistics.mean(accs)) < 1e-3
    assert abs(acc_std - statistics.stdev(accs)) < 1e-3


def test_clustering_benchmark_reports_bad_input_in_one_line(fashion_dir, tmp_path):
    # found when the data are set up inside fit: more labels than training images
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(CONFIGS / "semi_supervised_mnist_100.yaml"), "--data-dir", str(fashion_dir),
         "--epochs", "1", "--", "--trainer.logger=false", "--data=aae_lightning.FashionMNISTDataModule", "--data.val_size=100",
         "--data.num_labeled=1000"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: FashionMNISTDataModule: num_labeled=1000 is larger than the training split (500 images)"
    assert "Traceback" not in out.stderr


MNIST_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-sample"


@pytest.mark.skipif(not MNIST_SAMPLE.is_dir(), reason="the real MNIST sample comes with shared/ beside the checkout")
def test_clustering_benchmark_runs_a_named_real_dataset(tmp_path):
    lines = run_benchmark("clustering_10.yaml", ["--datasets", "mnist-sample"], ["--trainer.limit_train_batches=3"], tmp_path)
    assert [line for line in lines if line.startswith("mnist-sample seed")] == ["mnist-sample seed 0", "mnist-sample seed 1"]
    (summary,) = [line for line in lines if line.startswith("test over 2 seeds mnist-sample ")]
    assert "purity=" in summary and "nmi=" in summary and "merged/acc=" in summary
    # with MergedClusters, which of the 30 clusters each of the 10 groups holds: every cluster in one group
    groups = [line.split("): ", 1)[1] for line in lines if line.startswith("test merged groups (group: its clusters): ")]
    assert len(groups) == 2
    for line in groups:
        members = [cell.split(": ")[1].split() for cell in line.split("; ")]
        assert len(members) == 10 and sorted(int(k) for m in members for k in m) == list(range(30))
    assert len([line for line in lines if line.startswith("test merged groups mixing classes")]) == 2


# a process timing five paths, bf16 emulated on a CPU without bf16 units (about 30 s): `make test-slow`
@pytest.mark.slow
def test_throughput_benchmark_compares_precisions_in_one_process(fashion_dir, tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("throughput.py")), "--data-dir", str(fashion_dir),
                          "--steps", "3", "--warmup", "1", "--repeats", "1", "--val-size", "100"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rates = dict(re.findall(r"^\s*(\S+ +\S+): +(\d+) samples/s", out.stdout, re.M))
    assert {" ".join(k.split()) for k in rates} == {"ours 32", "loop-dl 32", "loop-mem 32", "ours bf16-mixed", "loop-mem bf16-mixed"}
    ratios = dict(re.findall(r"^(.+) = ([\d.]+)$", out.stdout, re.M))
    assert {"ours / loop-mem (32)", "ours / loop-mem (bf16-mixed)", "ours bf16-mixed / ours 32"} <= set(ratios)
    assert all(float(v) > 0 for v in ratios.values())


# four short fits of the K = 16 config (about 40 s): `make test-slow`
@pytest.mark.slow
@pytest.mark.skipif(not MNIST_SAMPLE.is_dir(), reason="the real MNIST sample comes with shared/ beside the checkout")
def test_conv_layout_benchmark_times_both_layouts_of_a_config(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("conv_layout.py")), "--configs", str(CONFIGS / "clustering.yaml"),
                          "--epochs", "1", "--repeats", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith(str(CONFIGS / "clustering.yaml"))]
    contiguous, channels_last, ratio = map(float, re.search(r"contiguous ([\d.]+) s, channels-last ([\d.]+) s .* = ([\d.]+)$", line).groups())
    assert contiguous > 0 and channels_last > 0 and ratio == pytest.approx(contiguous / channels_last, abs=0.01)
    assert not list(tmp_path.rglob("*.ckpt"))


# a fit, PCA and t-SNE in a process (about 30 s): `make test-slow`
@pytest.mark.slow
@pytest.mark.skipif(not MNIST_SAMPLE.is_dir(), reason="the real MNIST sample comes with shared/ beside the checkout")
def test_dim_reduction_benchmark_tables_the_map_against_pca_and_tsne(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("dim_reduction.py")), "--datasets", "mnist-sample", "--minutes", "0.2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    for method in ("AAE map W y + z", "PCA (fit on the training split)", "t-SNE"):
        knn, trust = map(float, re.findall(r"\| ([\d.]+) ", rows[method])[:2])
        assert 0.1 < knn <= 1 and 0.5 < trust <= 1, rows[method]
    assert "cannot" in rows["t-SNE"]
