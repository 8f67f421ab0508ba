import signal
import subprocess
import sys
import time

import pytest
import torch

from aae_lightning.checkpointing import AtomicCheckpointIO
from conftest import CONFIGS


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


def test_sigterm_saves_a_last_checkpoint_that_loads_safely(mnist_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "aae_lightning", "fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}",
         "--data.download=false", "--data.val_size=100", "--data.batch_size=1", "--trainer.max_epochs=100000",
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("runs/*/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.5)
        (last,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
        time.sleep(3)  # into the second epoch: 500 batches of one image take longer than this
        step_before = torch.load(last, weights_only=True)["global_step"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    checkpoint = torch.load(last, weights_only=True)  # no pickled objects: loads without executing code
    assert checkpoint["global_step"] > step_before, "the interrupt saved no newer checkpoint"
    assert checkpoint["global_step"] % (3 * 500), "expected a checkpoint from the middle of an epoch"
    assert len(checkpoint["optimizer_states"]) == 3
    assert not list(last.parent.glob(".*.tmp"))
