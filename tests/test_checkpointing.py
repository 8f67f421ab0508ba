import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb
import yaml

from aae_lightning.checkpointing import AtomicCheckpointIO, BestCheckpoint
from aae_lightning.cli import cli_main
from aae_lightning.offline_runs import offline_runs
from conftest import CONFIGS


def own_wandb_service() -> dict:
    """The environment for a separately launched fit: W&B passes its service's address to child
    processes, and a child killed there would leave its run registered in this process's service."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# Ctrl-C in `make test` (a lost signal once hung a clean clone there); SIGTERM takes the same path, in `make test-slow`
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupt_saves_a_last_checkpoint_that_loads_safely(sig, mnist_dir, tmp_path):
    # stderr to a file, not a pipe: an unread pipe fills up and blocks the child's shutdown
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aae_lightning", "fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}",
             "--data.download=false", "--data.val_size=100", "--data.batch_size=1", "--trainer.max_epochs=100000",
             "--trainer.enable_progress_bar=false"],
            cwd=tmp_path, env=own_wandb_service(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # the first epoch's end writes last.ckpt: a few seconds alone, minutes on a busy machine
        deadline = time.monotonic() + 200
        while not list(tmp_path.glob("runs/*/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.5)
        (last,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
        time.sleep(3)  # into the second epoch: 500 batches of one image take longer than this
        step_before = torch.load(last, weights_only=True)["global_step"]
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    checkpoint = torch.load(last, weights_only=True)  # no pickled objects: loads without executing code
    assert checkpoint["global_step"] > step_before, "the interrupt saved no newer checkpoint"
    # saved at a batch boundary (three optimizer steps each); whether mid-epoch depends on when the
    # signal lands (during the epoch-end validation it is the boundary), so that is not asserted here:
    # the SIGKILL test covers resuming from the middle of an epoch
    assert checkpoint["global_step"] % 3 == 0
    assert len(checkpoint["optimizer_states"]) == 3
    assert not list(last.parent.glob(".*.tmp"))


class ResumeProbe(L.Callback):
    """Records, when training (re)starts, the step counter, weights and optimizer states."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        ResumeProbe.seen = {
            "global_step": trainer.global_step,
            "state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer_states": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        }


def _override_config(path: Path, probe: bool) -> Path:
    callbacks = [
        {"class_path": "aae_lightning.InterruptCheckpoint"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 30}},
    ]
    if probe:
        callbacks.append({"class_path": "test_checkpointing.ResumeProbe"})
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def _assert_same_tensors(a, b, what):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


# three fits, one killed (about a minute): `make test-slow`; `make test` resumes from an epoch's end
@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly_where_the_checkpoint_left_off(mnist_dir, tmp_path, monkeypatch):
    """An uninterrupted run and a run SIGKILLed mid-epoch then resumed with --ckpt_path last end
    with identical weights: model, optimizers, step counters, data position and RNG all resume."""
    steps_per_epoch = 3 * 500  # 500 training images, batch size 1, three optimizer steps each
    args = ["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
            "--data.val_size=100", "--data.batch_size=1", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0", "--model.encoder=aae_lightning.nets.MLPEncoder", "--model.encoder.hidden=[32]",
            "--model.decoder=aae_lightning.nets.MLPDecoder", "--model.decoder.hidden=[32]", "--model.discriminator_hidden=[32]"]

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    cli_main([*args, "--config", str(_override_config(reference_dir / "ckpt.yaml", probe=False))])
    (reference_ckpt,) = reference_dir.glob("runs/*/*/checkpoints/last.ckpt")
    reference = torch.load(reference_ckpt, weights_only=True)
    wandb.teardown()  # its service resolves relative paths against the directory it started in

    with (killed_dir / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "aae_lightning", *args, "--config", str(_override_config(killed_dir / "ckpt.yaml", probe=False))],
                                cwd=killed_dir, env=own_wandb_service(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        step = 0
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(killed_dir.glob("runs/*/*/checkpoints/last.ckpt"))
            if found:
                step = torch.load(found[0], weights_only=True)["global_step"]
                if steps_per_epoch + 150 <= step < 2 * steps_per_epoch - 150:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-epoch (last step seen {step}): {(killed_dir / 'stderr.txt').read_text()[-2000:]}"
    (last,) = killed_dir.glob("runs/*/*/checkpoints/last.ckpt")
    killed = torch.load(last, weights_only=True)
    assert killed["global_step"] % steps_per_epoch, "expected a checkpoint from the middle of an epoch"
    run_id = last.parent.parent.name

    monkeypatch.chdir(killed_dir)
    cli_main([*args, "--config", str(_override_config(killed_dir / "probe.yaml", probe=True)), "--ckpt_path", "last"])

    seen = ResumeProbe.seen
    assert seen["global_step"] == killed["global_step"]
    _assert_same_tensors(seen["state_dict"], killed["state_dict"], "weights at resume")
    _assert_same_tensors(seen["optimizer_states"], killed["optimizer_states"], "optimizer states at resume")

    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == reference["global_step"] == 3 * steps_per_epoch
    _assert_same_tensors(resumed["state_dict"], reference["state_dict"], "final weights vs the uninterrupted run")

    runs = offline_runs(killed_dir)
    assert {r.id for r in runs} == {run_id}, "the resumed fit must continue the killed run's W&B run"
    resumed_run = max(runs, key=lambda r: r.dir.name)
    # W&B's step axis counts batches (three optimizer steps each): the history picks up after the checkpoint
    batches_at_kill = killed["global_step"] // 3
    assert batches_at_kill <= min(resumed_run.values("trainer/global_step")) <= batches_at_kill + 50


def test_resume_from_an_epochs_end_trains_the_weights_an_uninterrupted_fit_would(mnist_dir, tmp_path, monkeypatch):
    """The run defaults' last.ckpt at an epoch's end, resumed with --ckpt_path last: the data order
    (the whole set and the cycled labelled set), RNG, optimizers, schedule and weight average go on
    as in one uninterrupted fit. Semi-supervised, for the labelled loader and the lr milestone."""
    args = ["fit", "--config", str(CONFIGS / "semi_supervised_mnist_100.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
            "--data.val_size=100", "--data.batch_size=50", "--data.num_labeled=20", "--model.lr_milestones=[1]",
            "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0", "--model.figures_every_n_epochs=0",
            "--model.encoder=aae_lightning.nets.MLPEncoder", "--model.encoder.hidden=[32]",
            "--model.decoder=aae_lightning.nets.MLPDecoder", "--model.decoder.hidden=[32]", "--model.discriminator_hidden=[32]"]
    finals = {}
    for name, stages in (("uninterrupted", [["--trainer.max_epochs=2"]]),
                         ("resumed", [["--trainer.max_epochs=1"], ["--trainer.max_epochs=2", "--ckpt_path", "last"]])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        for stage in stages:
            cli_main([*args, *stage])
            wandb.teardown()
        (last,) = (tmp_path / name).glob("runs/*/*/checkpoints/last.ckpt")
        finals[name] = torch.load(last, weights_only=True)
    reference, resumed = finals["uninterrupted"], finals["resumed"]
    assert resumed["global_step"] == reference["global_step"] and resumed["epoch"] == reference["epoch"] == 2
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        _assert_same_tensors(resumed[key], reference[key], key)
    (averaging,) = [k for k in reference["callbacks"] if "EMAWeights" in k]  # the other callbacks' states name their run
    _assert_same_tensors(resumed["callbacks"][averaging], reference["callbacks"][averaging], averaging)


def test_a_finished_fit_leaves_its_final_weights_in_last_ckpt_when_the_metric_peaked_earlier(mnist_dir, tmp_path):
    """Lightning writes last.ckpt beside each new best or periodic checkpoint, and at the end of fit
    only if it never wrote one; after a run's metric has peaked, ``test --ckpt_path last`` or a resume
    would start from the peak's weights, not the run's. Here the best is the highest reconstruction
    loss: epoch 0, as a real run's peak comes before its end."""
    cli = cli_main(["--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
                    "--data.val_size=100", "--data.batch_size=50", "--trainer.max_epochs=3", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0", "--model.figures_every_n_epochs=0",
                    f"--trainer.default_root_dir={tmp_path}"], run=False)
    peaked_first = BestCheckpoint(monitor="val/recon_loss", mode="max", dirpath=tmp_path / "checkpoints")
    cli.trainer.callbacks = [peaked_first if isinstance(cb, BestCheckpoint) else cb for cb in cli.trainer.callbacks
                             if type(cb) is not L.pytorch.callbacks.ModelCheckpoint]
    cli.trainer.fit(cli.model, cli.datamodule)

    assert Path(peaked_first.best_model_path).name.startswith("epoch=0-")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == cli.trainer.global_step and last["epoch"] == 3
    _assert_same_tensors(last["state_dict"], cli.model.state_dict(), "state_dict")


def test_a_checkpoint_from_before_the_terms_were_named_still_validates(mnist_dir, tmp_path):
    """Checkpoints written before the terms were keyed by name saved them as a list; the CLI reads
    them as a mapping, each named after its class."""
    args = ["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false", "--data.val_size=100",
            "--trainer.limit_val_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--model.figures_every_n_epochs=0"]
    cli_main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.num_sanity_val_steps=0",
              f"--trainer.default_root_dir={tmp_path}"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["hyper_parameters"]["terms"]
    assert list(saved) == ["mutual_information", "consistency", "paired", "self_labelling", "contrast", "neighbours"]
    checkpoint["hyper_parameters"]["terms"] = [*saved.values(), saved["consistency"]]  # the old layout, a class twice
    torch.save(checkpoint, tmp_path / "old.ckpt")

    cli = cli_main(["validate", *args, "--ckpt_path", str(tmp_path / "old.ckpt")])
    assert list(cli.model.terms) == ["mutual_information", "consistency", "paired_mutual_information", "self_labelling",
                                     "instance_contrast", "neighbour_agreement", "consistency_2"]
    assert cli.model.terms["neighbour_agreement"].weight == 3.0 and "val/purity" in cli.trainer.callback_metrics
