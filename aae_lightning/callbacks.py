"""Figures of the latent space during training (latent scatter plots, cluster grids, prior samples),
logged to W&B and written as PNG files (drawn by :mod:`aae_lightning.figures`).

They run on rank zero only, every ``every_n_epochs`` validation epochs (the first one included),
and read what the validation steps already returned instead of encoding the data again.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from aae_lightning.figures import (
    cluster_grid,
    cluster_sizes,
    latent_scatter,
    prior_samples,
    representation_map,
    save_images,
    style_content_grid,
)
from aae_lightning.runs import run_directory


def log_images(trainer: L.Trainer, images: dict[str, Image.Image]) -> None:
    """To W&B where a W&B logger is, and always as ``figures/<name>_epoch<N>.png`` under the run's
    directory, so an offline run can be looked at with any image viewer."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for key, image in images.items():
                logger.log_image(key=key, images=[image], step=trainer.global_step)
    save_images(images, run_directory(trainer) / "figures", suffix=f"_epoch{trainer.current_epoch:04d}")


@contextmanager
def figure_rng() -> Iterator[None]:
    """Figures draw (prior samples, randomized PCA) from their own seeded stream: drawing them never
    changes the training run's random numbers, and every epoch's samples use the same draws."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(0)
        yield


def draws_this_epoch(trainer: L.Trainer, every_n_epochs: int) -> bool:
    return trainer.is_global_zero and not trainer.sanity_checking and trainer.current_epoch % every_n_epochs == 0


def check_every_n_epochs(owner: object, every_n_epochs: int) -> int:
    if every_n_epochs < 1:
        raise ValueError(f"{type(owner).__name__}: every_n_epochs must be >= 1, got {every_n_epochs}")
    return every_n_epochs


class _ValidationFigures(L.Callback):
    """Collects validation outputs on the epochs it draws, then calls ``draw``."""

    needs_images = False

    def __init__(self, every_n_epochs: int = 1, max_examples: int = 5000):
        self.every_n_epochs = check_every_n_epochs(self, every_n_epochs)
        self.max_examples = max_examples
        self._collected: list[dict] = []

    def _active(self, trainer) -> bool:
        return draws_this_epoch(trainer, self.every_n_epochs)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._collected = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self._active(trainer) or sum(len(c["labels"]) for c in self._collected) >= self.max_examples:
            return
        item = {"labels": outputs["labels"].cpu(), **{f"code/{k}": v.detach().float().cpu() for k, v in outputs["codes"].items()}}
        if self.needs_images:
            item["x"] = batch[0].cpu()
        self._collected.append(item)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._active(trainer) and self._collected:
            outputs = {k: torch.cat([c[k] for c in self._collected]) for k in self._collected[0]}
            self._collected = []
            with figure_rng():
                log_images(trainer, self.draw(pl_module, outputs))

    def draw(self, pl_module, outputs: dict[str, torch.Tensor]) -> dict[str, Image.Image]:
        raise NotImplementedError


class LatentPlot(_ValidationFigures):
    """Scatter of a continuous code coloured by the true label (its first two principal
    components when it has more than two dimensions), and the histogram of cluster sizes when the
    model has a cluster code.

    Args:
        code: the code to scatter; default the first non-categorical code.
    """

    def __init__(self, code: str | None = None, every_n_epochs: int = 1, max_examples: int = 5000):
        super().__init__(every_n_epochs, max_examples)
        self.code = code

    def draw(self, pl_module, outputs):
        return {**latent_scatter(pl_module, outputs, self.code), **cluster_sizes(pl_module, outputs)}


class RepresentationMap(_ValidationFigures):
    """The paper's sec. 7 map: the decoder's input W y + z of the validation set coloured by the
    true label, with the cluster heads marked (more than two dimensions: heads on a circle)."""

    def draw(self, pl_module, outputs):
        return representation_map(pl_module, outputs)


class ClusterGrid(_ValidationFigures):
    """The paper's Figure 9: one row per cluster, its "head" (the decoder at that one-hot cluster
    code with every other code at zero) followed by the validation images the encoder assigns to
    the cluster with the highest confidence."""

    needs_images = True

    def __init__(self, images_per_cluster: int = 10, every_n_epochs: int = 1, max_examples: int = 5000):
        super().__init__(every_n_epochs, max_examples)
        self.images_per_cluster = images_per_cluster

    def draw(self, pl_module, outputs):
        return cluster_grid(pl_module, outputs, self.images_per_cluster)


class PriorSamples(L.Callback):
    """Images decoded from codes sampled from the priors."""

    def __init__(self, num_samples: int = 100, every_n_epochs: int = 1):
        self.num_samples = num_samples
        self.every_n_epochs = check_every_n_epochs(self, every_n_epochs)

    def on_validation_epoch_end(self, trainer, pl_module):
        if draws_this_epoch(trainer, self.every_n_epochs):
            with figure_rng():
                log_images(trainer, prior_samples(pl_module, self.num_samples))


class StyleGrid(L.Callback):
    """The paper's Figures 6-8, style against content: each row decodes one draw of the other
    codes from their priors (a style), each column one class of the categorical content code.

    Args:
        content_code: the categorical code; default the cluster code, else the first categorical one.
        num_styles: rows of the grid.
    """

    def __init__(self, content_code: str | None = None, num_styles: int = 10, every_n_epochs: int = 1):
        self.content_code = content_code
        self.num_styles = num_styles
        self.every_n_epochs = check_every_n_epochs(self, every_n_epochs)

    def on_validation_epoch_end(self, trainer, pl_module):
        if draws_this_epoch(trainer, self.every_n_epochs):
            with figure_rng():
                log_images(trainer, style_content_grid(pl_module, self.content_code, self.num_styles))
