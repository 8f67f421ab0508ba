import subprocess
import sys
from pathlib import Path

import pytest
import sweeps
import yaml

from aae_lightning.cli import cli_main
from aae_lightning.offline_runs import offline_runs
from aae_lightning.sweep import OfflineSweep, expand_command, load_sweep_config
from aae_lightning.tracking import choose_wandb_mode, has_wandb_credentials
from conftest import ONLY_THE_WEIGHT_AVERAGE

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_files_validate_and_their_commands_parse(path, capsys, monkeypatch):
    config = load_sweep_config(path)
    assert not sweeps.schema_violations_from_proposed_config(config)
    proposal = sweeps.next_run(config, [])
    command = expand_command(config, {k: v["value"] for k, v in proposal.config.items()})
    assert command[:4] == ["/usr/bin/env", "python", "-m", "aae_lightning"]
    monkeypatch.chdir(ROOT)  # the commands name configs relative to the repository
    with pytest.raises(SystemExit) as exit_info:
        cli_main(command[4:] + ["--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in proposal.config.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value["value"] or isinstance(value["value"], str), key
    # a trial is its config with some settings changed: every code and term of the config stays
    with pytest.raises(SystemExit):
        cli_main([arg for arg in command[4:] if arg.startswith("--config") or not arg.startswith("--")] + ["--print_config"])
    base = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    for collection in ("codes", "terms"):
        assert list(printed["model"]["init_args"][collection] or {}) == list(base[collection] or {}), collection


def test_invalid_sweep_yaml_gets_the_schema_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sideways\nparameters:\n  lr: {min: 1}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: invalid sweep config {bad}") and "sideways" in err[0]


# two trials, each a process with its own W&B run (about a minute): `make test-slow`
@pytest.mark.slow
def test_two_trial_offline_sweep_records_runs_and_ranks_them(tmp_path, mnist_dir):
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tiny", "method": "grid",
        "metric": {"name": "val/purity", "goal": "maximize"},
        "parameters": {"model.init_args.lr": {"values": [0.0001, 0.001]}},
        "command": ["${env}", "${interpreter}", "-m", "aae_lightning", "fit", "--config", str(ROOT / "configs/clustering.yaml"), "${args}"],
    }))
    tiny = [f"--data.data_dir={mnist_dir}", "--data.download=false", "--data.val_size=100", "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false", *ONLY_THE_WEIGHT_AVERAGE,
            "--trainer.enable_checkpointing=false"]
    result = subprocess.run([sys.executable, "-m", "aae_lightning", "sweep", str(sweep_file), "--count", "3", "--", *tiny],
                            cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r.id: r for r in offline_runs(tmp_path / "runs")}
    assert len(runs) == 2
    sweep = OfflineSweep(sweep_file, tmp_path / "runs" / "sweeps")
    assert [t["state"] for t in sweep.trials] == ["finished", "finished"]
    for trial in sweep.trials:
        run = runs[trial["id"]]
        assert len(run.values("val/purity")) == 2
        assert trial["summary"]["val/purity"] == run.summary["val/purity"]
        assert run.config["model"]["init_args"]["lr"] == trial["params"]["model.init_args.lr"]
    # the grid has two points: the third proposal finds the space exhausted
    assert "exhausted" in result.stdout
    board = result.stdout[result.stdout.index("rank"):].splitlines()[1:3]
    values = [float(line.split()[2]) for line in board]
    assert values == sorted(values, reverse=True)
    assert {line.split()[1] for line in board} == set(runs)


def test_interrupted_trial_is_marked_and_the_sweep_resumes(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "resume", "method": "grid", "metric": {"name": "val/purity", "goal": "maximize"},
        "parameters": {"x": {"values": [1, 2]}}, "command": ["${env}", "true", "${args}"],
    }))
    sweep = OfflineSweep(sweep_file, tmp_path)
    sweep.trials = [{"id": "done0001", "params": {"x": 1}, "state": "finished", "summary": {"val/purity": 0.5}, "history": []},
                    {"id": "dead0002", "params": {"x": 2}, "state": "running", "summary": {}, "history": []}]
    sweep.save()
    resumed = OfflineSweep(sweep_file, tmp_path)
    assert [t["state"] for t in resumed.trials] == ["finished", "crashed"]
    assert resumed.trials[0]["summary"] == {"val/purity": 0.5}


@pytest.mark.parametrize(
    "env, netrc, expected",
    [
        ({}, None, "offline"),
        ({"WANDB_API_KEY": "0" * 40}, None, "online"),
        ({}, "machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n", "online"),
        ({"WANDB_MODE": "online"}, None, "online"),
        ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "0" * 40}, None, "disabled"),
    ],
)
def test_wandb_mode_follows_credentials_unless_the_user_chose(env, netrc, expected, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    netrc_path = tmp_path / "netrc"
    if netrc:
        netrc_path.write_text(netrc)
        netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert choose_wandb_mode() == expected
    assert has_wandb_credentials() == bool(netrc or "WANDB_API_KEY" in env)


def test_hyperband_stops_a_running_trial_that_trails_the_finished_ones(tmp_path):
    sweep_file = tmp_path / "hb.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "hb", "method": "random", "metric": {"name": "val/purity", "goal": "maximize"},
        "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2},
        "parameters": {"x": {"values": [1, 2]}}, "command": ["${env}", "true"],
    }))
    sweep = OfflineSweep(sweep_file, tmp_path)
    good = [{"val/purity": v} for v in (0.5, 0.7, 0.8, 0.85)]
    sweep.trials = [{"id": f"good{i}", "params": {"x": 1}, "state": "finished", "summary": {"val/purity": 0.85}, "history": good}
                    for i in range(4)]
    weak = {"id": "weak", "params": {"x": 2}, "state": "running", "summary": {}, "history": [{"val/purity": 0.1}] * 3}
    strong = {"id": "strong", "params": {"x": 2}, "state": "running", "summary": {}, "history": [{"val/purity": v} for v in (0.9, 0.95, 0.96)]}
    sweep.trials += [weak, strong]
    # hyperband compares the metric at epochs 2, 4, 8, ... (0-based) with the finished trials'
    assert sweep._should_stop(weak)
    assert not sweep._should_stop(strong)
