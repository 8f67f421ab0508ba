"""Deterministic image transforms that a DataModule applies once to every split as it loads it
(``transform:`` in the data config): label-free normalisations of the images themselves, unlike
the random perturbations (``perturbations.py``) that the training terms draw at every step."""

import torch
import torch.nn.functional as F

from aae_lightning.settings import SettingsRepr


class ImageTransform(SettingsRepr):
    """Maps a float image batch (N, C, H, W) in [0, 1] to another of the same shape."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Deskew(ImageTransform):
    """Shears each image about its centre of mass so that its ink has no slant: x' = x - a (y - m_y),
    with a = cov(x, y) / var(y) of the ink (the moment-based deskewing of LeCun's MNIST page, which
    lowers the error of most classifiers there). Slant is the writer's, not the digit's, and the
    clusterings cut digits by it (a K = 10 run held 4s and 9s in two clusters, one leaning left by
    about 0.2, the other right by as much: docs/experiments.md, "Deskewed digits"). ``batch_size``: images per batched
    ``grid_sample``, so that a 60,000-image split needs no second copy of itself in memory."""

    def __init__(self, batch_size: int = 4096):
        if batch_size < 1:
            raise ValueError(f"Deskew: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @staticmethod
    def slant(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cov(x, y) / var(y), the mean row m_y) of each image's ink (channels averaged), x the
        column and y the row."""
        ink = images.mean(1)
        rows = torch.arange(ink.shape[1], dtype=ink.dtype, device=ink.device)[:, None]
        cols = torch.arange(ink.shape[2], dtype=ink.dtype, device=ink.device)[None]
        mass = ink.sum((1, 2)).clamp_min(1e-8)
        my, mx = (ink * rows).sum((1, 2)) / mass, (ink * cols).sum((1, 2)) / mass
        dy, dx = rows - my[:, None, None], cols - mx[:, None, None]
        return (ink * dx * dy).sum((1, 2)) / (ink * dy * dy).sum((1, 2)).clamp_min(1e-8), my

    def __call__(self, images):
        return torch.cat([self._deskew(chunk) for chunk in images.split(self.batch_size)]) if len(images) else images

    def _deskew(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        a, my = self.slant(images)
        # the output pixel (x', y) samples the input at x = x' + a (y - m_y), in affine_grid's
        # coordinates (-1..1 across each side, pixel centres at (2 i + 1) / size - 1)
        shear = a * h / w
        my_normalised = (2 * my + 1) / h - 1
        theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 1], theta[:, 0, 2] = shear, -shear * my_normalised
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
