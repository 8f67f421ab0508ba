"""``python -m aae_lightning sweep sweeps/X.yaml --count N [-- EXTRA CLI ARGS]``: a W&B sweep with no server.

The sweep YAML is the one ``wandb sweep`` takes. Proposals and early stops come from W&B's own
search engine (the ``sweeps`` package: grid, random, bayes, hyperband), commands are expanded with
wandb's own agent helpers, each trial runs as a subprocess, and its metric is read back from the
trial's local W&B run. Trials are grouped in W&B by the sweep's name so ``wandb sync`` uploads
them together. Every trial's state is saved to ``runs/sweeps/<name>/trials.json`` as soon as it
changes, so Ctrl-C or a crashed trial loses nothing and the same command resumes the sweep.
"""

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import sweeps
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from aae_lightning.offline_runs import OfflineRun, poll

POLL_SECONDS = 5


class SweepConfigError(ValueError):
    """The sweep YAML does not satisfy W&B's sweep schema."""


def load_sweep_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepConfigError(f"cannot read sweep config {path}: {err}") from None
    if not isinstance(config, dict):
        raise SweepConfigError(f"sweep config {path} must be a mapping, got {type(config).__name__}")
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise SweepConfigError(f"invalid sweep config {path}: " + "; ".join(violations))
    return config


def expand_command(config: dict, params: dict) -> list[str]:
    """The trial's command line, as ``wandb agent`` builds it (``${interpreter}`` is ``python``)."""
    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    variables |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [config.get("program", "")]}
    command = []
    for chunk in create_sweep_command(list(config.get("command") or [])):
        chunk = str(chunk)
        command += variables.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def find_run(run_id: str, roots: list[Path]) -> OfflineRun | None:
    for root in roots:
        for log in root.rglob(f"run-{run_id}.wandb") if root.is_dir() else []:
            return OfflineRun(log.parent)
    return None


class OfflineSweep:
    def __init__(self, config_path: Path, root: Path = Path("runs/sweeps"), extra_args: list[str] = ()):
        self.config = load_sweep_config(config_path)
        self.extra_args = list(extra_args)
        self.metric = self.config.get("metric", {}).get("name")
        self.goal = self.config.get("metric", {}).get("goal", "minimize")
        self.name = self.config.get("name") or Path(config_path).stem
        self.dir = root / self.name
        self.state_path = self.dir / "trials.json"
        self.trials: list[dict] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else []
        for trial in self.trials:
            if trial["state"] == "running":  # the sweep was interrupted while it ran
                trial["state"] = "crashed"
        self.run_roots = [Path.cwd() / "runs", Path(os.environ.get("WANDB_DIR", Path.cwd())) / "wandb"]

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.trials, indent=1))
        tmp.replace(self.state_path)

    def sweep_runs(self) -> list[sweeps.SweepRun]:
        # camelCase aliases: under pydantic 2 the snake_case field names are silently ignored
        return [
            sweeps.SweepRun(
                name=t["id"],
                config={k: {"value": v} for k, v in t["params"].items()},
                state=sweeps.RunState(t["state"]),
                summaryMetrics=t["summary"],
                sampledHistory=t["history"],
            )
            for t in self.trials
        ]

    def _read_back(self, trial: dict, wait_s: float = 0.0) -> None:
        # the run's folder is searched for once; later polls only re-read its record log
        run = OfflineRun(trial["run_dir"]) if "run_dir" in trial else find_run(trial["id"], self.run_roots)
        if run is None:
            return
        if not run.finished and wait_s > 0:  # an ended trial's W&B service may still be writing
            run = poll(lambda: OfflineRun(run.dir), lambda r: r.finished, wait_s)
        trial["run_dir"] = str(run.dir)
        trial["history"] = [{self.metric: v} for v in run.values(self.metric)]
        value = run.summary.get(self.metric, trial["history"][-1][self.metric] if trial["history"] else None)
        trial["summary"] = {self.metric: value} if value is not None else {}

    def _should_stop(self, trial: dict) -> bool:
        if "early_terminate" not in self.config:
            return False
        return any(run.name == trial["id"] for run in sweeps.stop_runs(self.config, self.sweep_runs()))

    def _run_trial(self, trial: dict) -> None:
        command = expand_command(self.config, trial["params"]) + self.extra_args
        env = dict(os.environ, WANDB_RUN_ID=trial["id"], WANDB_RUN_GROUP=self.name, WANDB_JOB_TYPE="sweep-trial")
        env.setdefault("WANDB_MODE", "offline")
        # `python` in the command must be this interpreter, as with `wandb agent` in an active venv
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        print(f"[{self.name}] trial {trial['id']}: {' '.join(command)}", flush=True)
        proc = subprocess.Popen(command, env=env)
        stopped = False
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                self._read_back(trial)
                if not stopped and self._should_stop(trial):
                    print(f"[{self.name}] trial {trial['id']}: stopped early by {self.config['early_terminate']['type']}", flush=True)
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
                self.save()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            self._read_back(trial)
            trial["state"] = "killed"
            self.save()
            raise
        trial["exitcode"] = proc.returncode
        self._read_back(trial, wait_s=30.0)
        trial["state"] = "finished" if proc.returncode == 0 or stopped else "failed"
        trial["stopped_early"] = stopped
        self.save()

    def run(self, count: int) -> None:
        for _ in range(count):
            proposal = sweeps.next_run(self.config, self.sweep_runs())
            if proposal is None:
                print(f"[{self.name}] the search space is exhausted", flush=True)
                break
            trial = {"id": secrets.token_hex(4), "params": {k: v["value"] for k, v in proposal.config.items()},
                     "state": "running", "summary": {}, "history": []}
            self.trials.append(trial)
            self.save()
            self._run_trial(trial)
        print(self.leaderboard(), flush=True)

    def leaderboard(self) -> str:
        scored = [t for t in self.trials if self.metric in t["summary"]]
        scored.sort(key=lambda t: t["summary"][self.metric], reverse=self.goal == "maximize")
        unscored = [t for t in self.trials if self.metric not in t["summary"]]
        lines = [f"sweep {self.name}: {self.metric} ({self.goal}), {len(self.trials)} trials, state in {self.state_path}",
                 f"{'rank':>4}  {'trial':<8}  {self.metric:>12}  {'state':<9}  params"]
        for rank, t in enumerate(scored + unscored, 1):
            value = f"{t['summary'][self.metric]:.4f}" if t in scored else "-"
            state = t["state"] + ("*" if t.get("stopped_early") else "")
            params = " ".join(f"{k}={v}" for k, v in t["params"].items())
            lines.append(f"{rank:>4}  {t['id']:<8}  {value:>12}  {state:<9}  {params}")
        runs = [t["run_dir"] for t in self.trials if "run_dir" in t]
        if runs:
            lines.append(f"upload with: wandb sync {' '.join(runs)}")
        return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aae_lightning sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a W&B sweep YAML, e.g. sweeps/clustering.yaml")
    parser.add_argument("--count", type=int, default=1, help="number of trials to run now")
    parser.add_argument("--root", type=Path, default=Path("runs/sweeps"), help="where the sweep's state is kept")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # appended to every trial's command
    args = parser.parse_args(argv[: len(argv) - len(extra) - bool(extra or "--" in argv)])
    try:
        sweep = OfflineSweep(args.config, args.root, extra)
    except SweepConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        sweep.run(args.count)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are kept in {sweep.state_path}; run the same command to resume", file=sys.stderr)
        sys.exit(130)
