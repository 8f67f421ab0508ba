"""Where a run's files go, and the summary printed when a fit ends."""

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger


def run_directory(trainer: L.Trainer) -> Path:
    """``<save_dir>/<name>/<version>`` of the first logger (with W&B the version is the run id), or
    the trainer's ``default_root_dir`` without a logger: the folder that holds the run's
    ``checkpoints/`` by Lightning's own rule, and our ``figures/`` and ``predictions/`` beside it."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version if isinstance(version, str) else f"version_{version}")


def checkpoint_run_directory(ckpt_path: str | None) -> Path | None:
    """The run a checkpoint belongs to: the folder above its ``checkpoints/``, else its own folder."""
    if not ckpt_path:
        return None
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def wandb_run_lines(trainer: L.Trainer) -> list[str]:
    """Where the W&B run is: its URL online, its folder and the ``wandb sync`` line offline."""
    lines = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            run = logger.experiment
            if os.environ.get("WANDB_MODE") == "offline":
                folder = Path(run.dir).parent
                lines += [f"W&B run (offline): {folder}", f"  upload it with: wandb sync {folder}"]
            elif run.url:
                lines.append(f"W&B run: {run.url}")
    return lines


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


class RunSummary(L.Callback):
    """At the end of ``fit``, on rank zero: the last and the best validation metrics with their
    epoch (best by the first ``ModelCheckpoint`` that monitors a metric), and where the
    checkpoints, figures and W&B run are. The CLI adds it to every trainer."""

    def __init__(self):
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if metrics:
            self.history.append((trainer.current_epoch, metrics))

    def summary(self, trainer: L.Trainer) -> list[str]:
        lines = [f"fit ended after {trainer.current_epoch} epochs"]
        if self.history:
            epoch, last = self.history[-1]
            lines.append(f"last validation (epoch {epoch}): {_format(last)}")
            monitored = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)
            if monitored is not None:
                scored = [(m[monitored.monitor], e, m) for e, m in self.history if monitored.monitor in m]
                if scored:
                    _, epoch, best = (max if monitored.mode == "max" else min)(scored, key=lambda s: s[0])
                    lines.append(f"best validation by {monitored.monitor} (epoch {epoch}): {_format(best)}")
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
                lines.append(f"best checkpoint: {cb.best_model_path}")
                break
        last = next((cb.last_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")), "")
        if last:
            lines.append(f"last checkpoint: {last}")
        figures = run_directory(trainer) / "figures"
        if figures.is_dir():
            lines.append(f"figures: {figures}")
        return lines + wandb_run_lines(trainer)

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            print("\n".join(self.summary(trainer)), flush=True)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [(e, dict(m)) for e, m in state_dict.get("history", [])]
