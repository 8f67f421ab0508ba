"""Two CPU processes over gloo, launched by Lightning itself, against one process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from aae_lightning.cli import cli_main
from conftest import CONFIGS, ONLY_THE_WEIGHT_AVERAGE

TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
COMMON = ["--data.download=false", "--data.val_size=100", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def run(args, cwd):
    result = subprocess.run([sys.executable, "-m", "aae_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def table(output: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(val/\w+)\s+([-\d.e]+)", output)}


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=[p.stem for p in TRAINER_PRESETS])
def test_trainer_presets_compose_with_experiment_configs(preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "clustering.yaml"), "--config", str(preset), "--print_config"])
    assert exit_info.value.code == 0
    assert "trainer:" in capsys.readouterr().out


# two processes on two cores for 1.5 minutes: `make test-slow`
@pytest.mark.slow
def test_ddp_fit_on_two_processes_and_metrics_equal_one_process(mnist_dir, tmp_path):
    config = str(CONFIGS / "clustering.yaml")
    data = [f"--data.data_dir={mnist_dir}", *COMMON]
    out = run(["fit", "--config", config, *data, *DDP, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
               *ONLY_THE_WEIGHT_AVERAGE, f"--trainer.default_root_dir={tmp_path}"], tmp_path)
    assert "GLOBAL_RANK: 1" in out and "MEMBER: 2/2" in out
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")

    both = table(run(["validate", "--config", config, *data, *DDP, "--ckpt_path", str(ckpt), "--trainer.callbacks=[]"], tmp_path))
    one = table(run(["validate", "--config", config, *data, "--trainer.devices=1", "--ckpt_path", str(ckpt),
                     "--trainer.callbacks=[]"], tmp_path))
    assert {"val/purity", "val/acc", "val/nmi", "val/ari", "val/recon_loss"} <= set(one)
    for key, value in one.items():
        assert both[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    # predict on two processes: one file, every image once, though 101 does not split evenly
    run(["predict", "--config", config, *data, *DDP, "--ckpt_path", str(ckpt), "--data.predict_split=val", "--data.val_size=101",
         "--trainer.callbacks=[]"], tmp_path)
    lines = (ckpt.resolve().parent.parent / "predictions" / "val.csv").read_text().splitlines()
    indices = [int(line.split(",")[0]) for line in lines[1:]]
    assert len(indices) == 101 and indices == sorted(set(indices))
