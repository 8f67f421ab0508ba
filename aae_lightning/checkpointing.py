"""Checkpoints that survive kills: atomic writes, and a last checkpoint on Ctrl-C or SIGTERM."""

import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, then renames it over the
    target: a process killed during a save leaves the previous checkpoint whole, never a
    truncated one (Lightning's default writes the target file in place)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C or SIGTERM (preemption), saves ``last.ckpt`` beside the other checkpoints so
    ``--ckpt_path last`` resumes from there. Other failures, a NaN loss among them, save nothing:
    the last good checkpoint stays as it was."""

    def on_exception(self, trainer, pl_module, exception):
        callback = trainer.checkpoint_callback
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and callback is not None and callback.dirpath:
            trainer.save_checkpoint(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
