"""Evaluate with an average of the recent weights instead of the last step's."""

import itertools

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import update_bn

from aae_lightning.callbacks import figure_rng


def warmed_up_decay(decay: float, updates: torch.Tensor) -> torch.Tensor:
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: early in a run the average spans
    about the last tenth of the steps, so it keeps up with the fast first epochs."""
    return torch.clamp((1 + updates) / (10 + updates), max=decay)


class EMAWeights(WeightAveraging):
    """An exponential moving average of the weights (Polyak averaging), on Lightning's
    ``WeightAveraging``: validation, test, the checkpoints' ``state_dict`` and the weights after
    ``fit`` are the average; training goes on with the raw weights, which a resumed run restores.

    Adversarial training never settles: from one epoch to the next the clusters trade images and
    the validation purity swings by several points, so the last step's weights are a draw from
    that swing. Lightning's ``EMAWeightAveraging`` with a fixed decay lags behind the first epochs
    instead; the decay here warms up (:func:`warmed_up_decay`).

    ``batch_norm_batches``: before each validation, at a checkpoint and when fit ends, the average's
    encoder recomputes its batch-norm statistics from this many batches of clean training images (as
    SWA does; 0 keeps the statistics averaged like the weights). The running statistics training
    leaves mix clean copies with noisy and distorted ones, and an average of statistics is not the
    statistics of the averaged weights; evaluation sees clean images.
    """

    def __init__(self, decay: float = 0.998, batch_norm_batches: int = 20):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMAWeights: decay={decay} must lie between 0 and 1")
        if batch_norm_batches < 0:
            raise ValueError(f"EMAWeights: batch_norm_batches={batch_norm_batches} must be >= 0")
        self.batch_norm_batches = batch_norm_batches

        @torch.no_grad()
        def average(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
            weight = 1 - warmed_up_decay(decay, updates)
            for a, c in zip(averaged, current):
                if a.is_floating_point():
                    a.lerp_(c, weight.to(a.dtype))
                else:  # integer buffers (batch norm's batch count) are counts, not weights
                    a.copy_(c)

        super().__init__(multi_avg_fn=average)
        self._raw_at_end: dict[str, torch.Tensor] | None = None
        # whether the average's batch-norm statistics were recomputed since its last update
        self._statistics_fresh = False

    def on_train_start(self, trainer, pl_module):
        self._raw_at_end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._statistics_fresh = False

    def on_validation_epoch_start(self, trainer, pl_module):
        self._recompute_batch_norm(trainer)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._recompute_batch_norm(trainer)
        # the parent copies the average into the module; ModelCheckpoint's last.ckpt comes after
        # it, and a run resumed from that file must still train on from the raw weights
        self._raw_at_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def _recompute_batch_norm(self, trainer) -> None:
        encoder = getattr(self.averaged_module, "encoder", None)
        if self._statistics_fresh or not self.batch_norm_batches or encoder is None:
            return
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
            return
        if trainer.datamodule is None:
            raise ValueError("EMAWeights recomputes the average's batch-norm statistics from the DataModule's training images: "
                             "fit with a DataModule, or set batch_norm_batches: 0")
        loader = trainer.datamodule.train_dataloader()
        if isinstance(loader, dict):  # semi-supervised: {"all": every training image, "labeled": ...}
            loader = loader["all"]
        # a loader's iterator and train-mode passes (dropout) draw random numbers from their own stream
        with figure_rng(), trainer.precision_plugin.forward_context():
            # batch norm cannot normalise a batch of one image (training refuses such batches in one line)
            batches = [batch for batch in itertools.islice(loader, self.batch_norm_batches) if len(batch[0]) > 1]
            if not batches:
                return
            update_bn(batches, encoder, device=next(encoder.parameters()).device)
        self._statistics_fresh = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._recompute_batch_norm(trainer)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_at_end is not None:
            checkpoint["current_model_state"] = self._raw_at_end

    @property
    def averaged_module(self) -> nn.Module | None:
        """The module with the averaged weights, kept beside the training one during fit; None before."""
        return None if self._average_model is None else self._average_model.module


def weight_average(trainer: "L.Trainer | None") -> EMAWeights | None:
    """The trainer's :class:`EMAWeights` callback, if it has one."""
    callbacks = [] if trainer is None else [cb for cb in trainer.callbacks if isinstance(cb, EMAWeights)]
    return callbacks[0] if callbacks else None
