"""The clustering benchmark script, run as users run it, on tiny IDX files."""

import re
import statistics
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "clustering.py"


def test_clustering_benchmark_trains_once_per_seed_and_summarises_the_test_figures(fashion_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(CONFIGS / "clustering_fashion.yaml"), "--data-dir", str(fashion_dir),
         "--epochs", "1", "--seeds", "0", "1", "--", "--trainer.callbacks=[]", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--data.val_size=100"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line for line in lines if line.startswith("seed ")] == ["seed 0", "seed 1"]
    tests = [dict(re.findall(r"(\w+)=([\d.]+)", line)) for line in lines if line.startswith("test purity")]
    assert len(tests) == 2
    # different seeds, different initial weights: the two runs end apart
    assert tests[0]["recon_loss"] != tests[1]["recon_loss"]
    (summary,) = [line for line in lines if line.startswith("test over 2 seeds")]
    acc_mean, acc_std = map(float, re.search(r"acc=([\d.]+)\+-([\d.]+)", summary).groups())
    accs = [float(t["acc"]) for t in tests]
    assert abs(acc_mean - statistics.mean(accs)) < 1e-3
    assert abs(acc_std - statistics.stdev(accs)) < 1e-3
