"""Deterministic image transforms that a DataModule applies once to every split as it loads it
(``transform:`` in the data config): label-free normalisations and markings of the images
themselves, unlike the random perturbations (``perturbations.py``) that the training terms draw at
every step."""

import torch
import torch.nn.functional as F

from aae_lightning.settings import SettingsRepr


def pen_changes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a thicker and a thinner pen change: each image's 3x3 grey-level dilation and erosion,
    less the image."""
    return F.max_pool2d(images, 3, stride=1, padding=1) - images, -F.max_pool2d(-images, 3, stride=1, padding=1) - images


def pen_blend(images: torch.Tensor, share: torch.Tensor, changes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Each image blended with its 3x3 grey-level dilation (a thicker pen) by its ``share`` where
    that is above 0, with its erosion (a thinner pen) by ``-share`` where below: shares in [-1, 1],
    one per image, shape (N,). ``changes``: the images' :func:`pen_changes`, for a caller that
    blends the same images more than once."""
    thicker, thinner = pen_changes(images) if changes is None else changes
    share = share.view(-1, 1, 1, 1)
    return images + share.clamp(min=0) * thicker + (-share).clamp(min=0) * thinner


class ImageTransform(SettingsRepr):
    """Maps a float image batch (N, C, H, W) in [0, 1] to another of the same shape, ``batch_size``
    images at a time (:meth:`transform_chunk`), so that a 60,000-image split needs no second copy
    of itself in memory."""

    def __init__(self, batch_size: int = 4096):
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.transform_chunk(chunk) for chunk in images.split(self.batch_size)]) if len(images) else images

    def transform_chunk(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Deskew(ImageTransform):
    """Shears each image about its centre of mass so that its ink has no slant: x' = x - a (y - m_y),
    with a = cov(x, y) / var(y) of the ink (the moment-based deskewing of LeCun's MNIST page, which
    lowers the error of most classifiers there). Slant is the writer's, not the digit's, and the
    clusterings cut digits by it (a K = 10 run held 4s and 9s in two clusters, one leaning left by
    about 0.2, the other right by as much: docs/experiments.md, "Deskewed digits"). ``batch_size``: images per batched
    ``grid_sample`` (:class:`ImageTransform`)."""

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

    def transform_chunk(self, images: torch.Tensor) -> torch.Tensor:
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


class PenWidth(ImageTransform):
    """Brings each image's strokes to one pen width: blends the image with its 3x3 grey-level
    dilation (thicker) or erosion (thinner) by the share at which the width of its ink,
    ``2 x ink / edge length`` (the ink's area over half its outline, the outline measured as the
    image's total variation), is ``width`` pixels (:func:`pen_blend`). Like slant, the pen is the writer's, not the
    digit's: clusters gathered bold digits of several classes (docs/experiments.md, "Pen width at
    load"). ``steps`` halvings of the share's range [-1, 1] find it (a precision of 2 / 2^steps);
    ``batch_size`` as in :class:`ImageTransform`."""

    def __init__(self, width: float = 2.5, steps: int = 10, batch_size: int = 4096):
        if width <= 0:
            raise ValueError(f"PenWidth: width must be > 0 pixels, got {width}")
        if steps < 1:
            raise ValueError(f"PenWidth: steps must be >= 1, got {steps}")
        self.width = width
        self.steps = steps
        super().__init__(batch_size)

    @staticmethod
    def measure(images: torch.Tensor) -> torch.Tensor:
        """The pen width in pixels of each image's ink (channels averaged): 2 x its sum over its
        total variation."""
        ink = images.mean(1)
        dx = F.pad(ink[:, :, 1:] - ink[:, :, :-1], (0, 1))
        dy = F.pad(ink[:, 1:] - ink[:, :-1], (0, 0, 0, 1))
        return 2 * ink.sum((1, 2)) / (dx**2 + dy**2).sqrt().sum((1, 2)).clamp_min(1e-8)

    def transform_chunk(self, images: torch.Tensor) -> torch.Tensor:
        # the width grows with the share: keep the half of the range that holds the target
        low, high = -images.new_ones(len(images)), images.new_ones(len(images))
        changes = pen_changes(images)
        for _ in range(self.steps):
            middle = (low + high) / 2
            too_wide = self.measure(pen_blend(images, middle, changes)) > self.width
            low, high = torch.where(too_wide, low, middle), torch.where(too_wide, middle, high)
        return pen_blend(images, (low + high) / 2, changes)


class LoopFill(ImageTransform):
    """Paints the background that each digit's ink encloses (the loops of 0, 6, 8 and 9, and of 4s
    and 2s written closed) grey, at ``value``: a pixel below ``threshold`` (channels averaged) is
    background, and background that no 4-connected path of background joins to the border is
    enclosed. Whether a stroke closes is what tells many 9s from 7s and 4s, and 8s from 3s, yet it
    is a few pixels of ink, and the clusterings overlooked it (K = 16 kept 7s without a loop among
    9s, most of which have one: docs/experiments.md, "Loops at load"). A filled loop is a patch of
    grey the encoder cannot miss and the decoder must draw. Apply it after :class:`PenWidth`, whose
    measure of the ink would count the grey."""

    def __init__(self, value: float = 0.3, threshold: float = 0.3, batch_size: int = 4096):
        if not 0 < value <= 1 or not 0 < threshold <= 1:
            raise ValueError(f"LoopFill: value and threshold must lie in (0, 1], got value={value} and threshold={threshold}")
        self.value = value
        self.threshold = threshold
        super().__init__(batch_size)

    def transform_chunk(self, images: torch.Tensor) -> torch.Tensor:
        background = images.mean(1, keepdim=True) < self.threshold
        outside = torch.zeros_like(background)
        outside[..., 0, :] = outside[..., -1, :] = outside[..., :, 0] = outside[..., :, -1] = True
        outside &= background
        # grow the outside by one pixel up, down, left or right through background until it stops
        while True:
            padded = F.pad(outside, (1, 1, 1, 1))
            grown = (outside | padded[..., :-2, 1:-1] | padded[..., 2:, 1:-1] | padded[..., 1:-1, :-2] | padded[..., 1:-1, 2:]) & background
            if torch.equal(grown, outside):
                break
            outside = grown
        enclosed = (background & ~outside).expand_as(images)
        return torch.where(enclosed, torch.full_like(images, self.value), images)
