"""Checkpoints that survive kills (atomic writes, a last checkpoint on Ctrl-C or SIGTERM) and that
load safely (no pickled code runs, a checkpoint of another config is named as such)."""

import os
import pickle
import re
import signal
import tempfile
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
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
    the last good checkpoint stays as it was.

    Ctrl-C takes effect at the end of the current training batch, as Lightning does for SIGTERM: a
    KeyboardInterrupt raised anywhere (inside a W&B call or a checkpoint write) can leave them
    half done and hang the shutdown. A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self._interrupted = False
        self._previous_handler = None

    def _on_sigint(self, signum, frame):
        self._interrupted = True
        signal.signal(signal.SIGINT, self._previous_handler)

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt

    def teardown(self, trainer, pl_module, stage):
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer, pl_module, exception):
        callback = trainer.checkpoint_callback
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and callback is not None and callback.dirpath:
            trainer.save_checkpoint(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")


class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint (and ``last.ckpt``) by the model's headline metric: ``val/error`` for a
    classifier, ``val/purity`` for a clustering model on labelled data, else ``val/recon_loss``
    (the model's ``monitor_metric``), so one default serves every experiment. Give ``monitor`` and
    ``mode`` to choose another. A finished fit's ``last.ckpt`` holds its final weights."""

    def __init__(self, monitor: str | None = None, mode: str = "min", save_last: bool = True, **kwargs):
        kwargs.setdefault("enable_version_counter", False)  # one last.ckpt, shared with the periodic one
        super().__init__(monitor=monitor, mode=mode, save_last=save_last, **kwargs)

    def setup(self, trainer, pl_module, stage):
        if self.monitor is None and hasattr(pl_module, "monitor_metric"):
            self.monitor, mode = pl_module.monitor_metric()
            self._ModelCheckpoint__init_monitor_mode(mode)  # mode sets kth_value and best_model_score's start
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module):
        # Lightning writes last.ckpt beside a new best and at the end of fit only if it never wrote
        # one: once the metric has peaked, a finished fit's last.ckpt would hold the peak's weights
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or used with this model."""


CHECKPOINT_NAMES = ("last", "best")  # --ckpt_path values that name an earlier run's checkpoint


def find_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last*.ckpt`` where this trainer's checkpoint callbacks write, or None.

    Lightning's own ``ckpt_path="last"`` looks only in the new run's directory, which for W&B is
    named after the new run id and so always empty; this searches the earlier runs' directories.
    """
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath]
    if len(dirs) < len(trainer.checkpoint_callbacks):  # some follow the logger: <save_dir>/<name>/<version>/checkpoints
        logger = trainer.logger
        if logger is None:
            dirs.append(Path(trainer.default_root_dir, "checkpoints"))
        else:
            dirs.extend(Path(logger.save_dir or trainer.default_root_dir, str(logger.name)).glob("*/checkpoints"))
    candidates = [p for d in dirs for p in d.glob("last*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def find_best_checkpoint(last: Path) -> Path | None:
    """The best checkpoint of the run that wrote ``last``, as ``last`` records it (the state of the
    callback that monitors a metric), or None. Looked up beside ``last``: the recorded path may
    be relative to where that run started, or the run's folder may have moved since."""
    states = load_checkpoint(last).get("callbacks") or {}
    recorded = [s["best_model_path"] for s in states.values() if isinstance(s, dict) and s.get("monitor") and s.get("best_model_path")]
    found = [last.parent / Path(p).name for p in recorded]
    return next((p for p in found if p.is_file()), None)


def named_checkpoint(trainer: L.Trainer, name: str, verb: str) -> Path:
    """``--ckpt_path last`` / ``best`` in a new process, where Lightning's own would look only at
    the new run (its empty folder, its fit's best, which there is none of): the newest earlier
    run's ``last.ckpt``, or that run's best."""
    last = find_last_checkpoint(trainer)
    if last is None:
        raise CheckpointError(f"{verb}: --ckpt_path {name} found no last.ckpt from an earlier run")
    if name == "last":
        return last
    best = find_best_checkpoint(last)
    if best is None:
        raise CheckpointError(f"{verb}: --ckpt_path best found no best checkpoint recorded in {last}, the newest run's last.ckpt")
    return best


def check_ckpt_path(ckpt_path: str | None, verb: str) -> None:
    """An empty ``--ckpt_path=`` is a slip, not "no checkpoint": say so before anything reads it."""
    if ckpt_path is not None and not str(ckpt_path).strip():
        raise CheckpointError(f"{verb}: --ckpt_path is empty; give a checkpoint file, or `last` for the newest last.ckpt")


def load_checkpoint(path: str | Path) -> dict:
    """Loads with ``weights_only=True``: tensors and plain containers only, so a pickle that would
    run code is refused instead of run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: it holds more than weights ({reason})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]} (corrupt or truncated?)") from None


def check_matches(checkpoint: dict, model: torch.nn.Module, path: str | Path) -> None:
    """Names the parameters where a checkpoint and the model built from the config disagree."""
    saved = checkpoint.get("state_dict")
    if saved is None:
        raise CheckpointError(f"{path} has no state_dict: not a Lightning checkpoint")
    current = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(saved[k].shape)} vs config {tuple(v.shape)}"
                for k, v in current.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{k} missing from the checkpoint" for k in current if k not in saved]
    problems += [f"{k} not in the model" for k in saved if k not in current]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{path} was written for a different config: {'; '.join(problems[:3])}{more}. "
            "Use the config the checkpoint was trained with."
        )


def upgrade_hyperparameters(hparams: dict) -> dict:
    """A checkpoint's saved hyperparameters in today's layout. Checkpoints written before the
    training terms were named hold them as a list: each entry is named after its class in snake
    case (``PairedMutualInformation``: ``paired_mutual_information``; a repeat gets a number)."""
    terms = hparams.get("terms")
    if not isinstance(terms, (list, tuple)):
        return hparams
    named: dict[str, dict] = {}
    for term in terms:
        base = re.sub(r"(?<!^)(?=[A-Z])", "_", term["class_path"].rsplit(".", 1)[-1]).lower()
        name, n = base, 1
        while name in named:
            n += 1
            name = f"{base}_{n}"
        named[name] = term
    return {**hparams, "terms": named}
