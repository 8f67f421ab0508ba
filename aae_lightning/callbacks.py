"""Figures of the latent space logged to W&B: latent scatter plots, cluster grids, prior samples.

They run on rank zero only, every ``every_n_epochs`` validation epochs (the first one included),
and read what the validation steps already returned instead of encoding the data again.
"""

import io

import lightning as L
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def figure_to_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    # as a PIL image: wandb 0.31 casts float tensors to uint8 without scaling [0, 1] up
    return to_pil_image(make_grid(images, nrow=nrow, padding=2, pad_value=0.5))


def log_images(trainer: L.Trainer, images: dict[str, list]) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for key, value in images.items():
                logger.log_image(key=key, images=value, step=trainer.global_step)


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
            log_images(trainer, self.draw(pl_module, outputs))

    def draw(self, pl_module, outputs: dict[str, torch.Tensor]) -> dict[str, list]:
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
        name = self.code or next((c.name for c in pl_module.codes if not c.prior.num_classes), None)
        images = {}
        if name is not None:
            z = outputs[f"code/{name}"]
            if z.shape[1] > 2:
                z = z - z.mean(0)
                _, _, v = torch.pca_lowrank(z, q=2, center=False)
                z = z @ v
            fig, ax = plt.subplots(figsize=(6, 6))
            points = ax.scatter(z[:, 0], z[:, 1], c=outputs["labels"], cmap="tab10", s=3, alpha=0.7)
            ax.legend(*points.legend_elements(), title="label", loc="upper right", fontsize="small")
            ax.set_title(f"code {name}" + (" (first two principal components)" if outputs[f"code/{name}"].shape[1] > 2 else ""))
            images[f"latent/{name}"] = [figure_to_image(fig)]
        if pl_module.cluster_code is not None:
            probs = outputs[f"code/{pl_module.cluster_code}"]
            sizes = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.bar(np.arange(len(sizes)), sizes.numpy())
            ax.set_xlabel("cluster")
            ax.set_ylabel("validation examples")
            images["latent/cluster_sizes"] = [figure_to_image(fig)]
        return images


class ClusterGrid(_ValidationFigures):
    """The paper's Figure 9: one row per cluster, its "head" (the decoder at that one-hot cluster
    code with every other code at zero) followed by the validation images the encoder assigns to
    the cluster with the highest confidence."""

    needs_images = True

    def __init__(self, images_per_cluster: int = 10, every_n_epochs: int = 1, max_examples: int = 5000):
        super().__init__(every_n_epochs, max_examples)
        self.images_per_cluster = images_per_cluster

    def draw(self, pl_module, outputs):
        if pl_module.cluster_code is None:
            return {}
        probs, x = outputs[f"code/{pl_module.cluster_code}"], outputs["x"]
        k = probs.shape[1]
        with torch.no_grad():
            codes = {c.name: torch.zeros(k, c.dim, device=pl_module.device) for c in pl_module.codes}
            codes[pl_module.cluster_code] = torch.eye(k, device=pl_module.device)
            heads = pl_module.decode(codes).cpu().clamp(0, 1)
        assigned, confidence = probs.argmax(1), probs.max(1).values
        blank = torch.zeros_like(x[0])
        rows = []
        for cluster in range(k):
            members = (assigned == cluster).nonzero().squeeze(1)
            best = members[confidence[members].argsort(descending=True)[: self.images_per_cluster]]
            row = [heads[cluster], *x[best]] + [blank] * (self.images_per_cluster - len(best))
            rows.extend(row)
        return {"clusters/grid": [grid_image(torch.stack(rows), nrow=self.images_per_cluster + 1)]}


class PriorSamples(L.Callback):
    """Images decoded from codes sampled from the priors."""

    def __init__(self, num_samples: int = 100, every_n_epochs: int = 1):
        self.num_samples = num_samples
        self.every_n_epochs = check_every_n_epochs(self, every_n_epochs)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not draws_this_epoch(trainer, self.every_n_epochs):
            return
        with torch.no_grad():
            samples = pl_module.decode(pl_module.sample_prior(self.num_samples)).cpu().clamp(0, 1)
        nrow = int(np.ceil(np.sqrt(self.num_samples)))
        log_images(trainer, {"samples/prior": [grid_image(samples, nrow)]})


class StyleGrid(L.Callback):
    """The paper's Figures 6-8, style against content: each row decodes one draw of the other
    codes from their priors (a style), each column one class of the categorical content code.

    Args:
        content_code: the categorical code; default the first one.
        num_styles: rows of the grid.
    """

    def __init__(self, content_code: str | None = None, num_styles: int = 10, every_n_epochs: int = 1):
        self.content_code = content_code
        self.num_styles = num_styles
        self.every_n_epochs = check_every_n_epochs(self, every_n_epochs)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not draws_this_epoch(trainer, self.every_n_epochs):
            return
        name = self.content_code or next((c.name for c in pl_module.codes if c.prior.num_classes), None)
        if name is None:
            return
        k = next(c.dim for c in pl_module.codes if c.name == name)
        with torch.no_grad():
            codes = {n: v.repeat_interleave(k, dim=0) for n, v in pl_module.sample_prior(self.num_styles).items()}
            codes[name] = torch.eye(k, device=pl_module.device).repeat(self.num_styles, 1)
            images = pl_module.decode(codes).cpu().clamp(0, 1)
        log_images(trainer, {"samples/style_content": [grid_image(images, nrow=k)]})
