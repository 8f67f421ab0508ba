"""Refill an empty cluster by cutting another cluster in two.

With more clusters than classes and free cluster sizes (the paired term's ``marginal_weight``
below 1), some clusters empty out during training while others keep two digits (9s with 7s at
K = 30); no training term moves images from a full cluster into an empty one. Bisecting k-means
does: the cluster whose images' hidden features lose the most squared distance to their centre
when cut in two gives its smaller half to the empty cluster. Purity cannot fall by a cut (it did
not rise at K = 30 either: docs/experiments.md).
"""

import lightning as L
import torch
from torch import nn

from aae_lightning.averaging import weight_average
from aae_lightning.data import require_image_datamodule


def two_means(features: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """A 2-means cut of the rows of ``features`` (True: the second group), started from the sign
    along their first principal direction, so it draws no random numbers."""
    centred = features - features.mean(0)
    side = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[0] > 0
    for _ in range(iterations):
        if side.all() or not side.any():
            break
        first, second = features[~side].mean(0), features[side].mean(0)
        nearer_second = (features - second).pow(2).sum(1) < (features - first).pow(2).sum(1)
        if torch.equal(nearer_second, side):
            break
        side = nearer_second
    return side


def scatter(features: torch.Tensor) -> torch.Tensor:
    """The squared distance of the rows to their mean, summed."""
    return (features - features.mean(0)).pow(2).sum()


@torch.no_grad()
def split_rows(layer: nn.Linear, source: int, target: int, kept: torch.Tensor, moved: torch.Tensor, margin: float) -> None:
    """Make output row ``target`` a copy of row ``source`` whose logit exceeds it by ``margin`` at
    the centre ``moved`` and falls short by as much at ``kept``; the boundary between the two is the
    hyperplane halfway between the centres. The other rows are left as they are."""
    direction = moved - kept
    scale = 2 * margin / direction.pow(2).sum()
    layer.weight[target] = layer.weight[source] + scale * direction
    layer.bias[target] = layer.bias[source] - scale * direction @ (kept + moved) / 2


def copy_slice(tensor: torch.Tensor, dim: int, source: int, target: int) -> None:
    """Index ``target`` of ``tensor`` along ``dim`` becomes a copy of index ``source``."""
    tensor.select(dim, target).copy_(tensor.select(dim, source))


def decoder_slices(module, code: str) -> list[tuple[nn.Parameter, int, int]]:
    """(parameter, dim, offset) of what the decoder reads of each category of ``code``: the
    decoder input layer's columns, or the code's heads' rows; none for fixed heads."""
    columns = module.decoder_input_columns(code)
    if columns is not None:
        return [(decoder_input_layer(module).weight, 1, columns.start)]
    return [(module.heads[code], 0, 0)] if code in module.heads else []


def decoder_input_layer(module) -> nn.Module:
    """The decoder's first module without children: the layer that reads the codes."""
    return next(m for m in module.decoder.modules() if not list(m.children()))


class ClusterSplit(L.Callback):
    """Every ``every_n_steps`` trainer steps from ``start_step``, the cluster code's emptiest
    cluster, if it holds fewer than ``min_share`` of an equal share of the first ``max_images``
    training images (their labels are not read), takes over part of another: the cluster whose
    images' hidden features (the encoder's last hidden layer, the features ``NeighbourAgreement``
    reads) lose the most scatter when cut in two by :func:`two_means`. One cut per check.

    The emptied cluster's output row is rewritten by :func:`split_rows` so that the cut's smaller
    half scores it ``margin`` above its old cluster. The decoder's input columns (or the heads'
    row) of the emptied cluster become copies of the old cluster's, so that reconstruction does
    not pull the moved images back; so do the optimizer moments of all these. The weight average
    (``EMAWeights``), whose pseudo-labels and evaluation would otherwise keep the old clusters, gets
    the same cut of the same images on its own features, and the terms forget the codes they hold
    from earlier batches (``NeighbourAgreement``'s memory, whose targets would pull them back too).

    At K = 30 it did not help: the cut that loses the most scatter goes through a large cluster of
    one digit, not the mixed one (docs/experiments.md: "K = 30: refilling an emptied cluster").

    Needs an encoder whose last layer is a ``Linear`` over the hidden features and, for a code
    the decoder reads directly, a decoder whose first layer is a ``Linear`` (the nets here); the
    checks use the training weights in eval mode (batch-norm running statistics)."""

    def __init__(self, start_step: int = 1500, every_n_steps: int = 600, min_share: float = 0.2, max_images: int = 2000,
                 margin: float = 2.0):
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(f"ClusterSplit: need start_step >= 0 and every_n_steps >= 1, got {start_step} and {every_n_steps}")
        if not 0 < min_share < 1:
            raise ValueError(f"ClusterSplit: min_share must lie in (0, 1) (of an equal share of the images), got {min_share}")
        if max_images < 2 or margin <= 0:
            raise ValueError(f"ClusterSplit: need max_images >= 2 and margin > 0, got {max_images} and {margin}")
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self.min_share = min_share
        self.max_images = max_images
        self.margin = margin
        self._step_before = 0
        self.splits: list[tuple[int, int, int]] = []

    def setup(self, trainer, pl_module, stage):
        if pl_module.cluster_code is None:
            raise ValueError("ClusterSplit: the model has no cluster code to split (set codes with a CategoricalPrior)")
        require_image_datamodule(trainer, "ClusterSplit")
        layer = pl_module.encoder_output_layer()
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"ClusterSplit: the encoder's last layer must be a Linear over its hidden features, got {type(layer).__name__}")
        if pl_module.decoder_input_columns(pl_module.cluster_code) is not None and not isinstance(decoder_input_layer(pl_module), nn.Linear):
            raise ValueError(f"ClusterSplit: the decoder's first layer must be a Linear over the codes, got {type(decoder_input_layer(pl_module)).__name__}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # a batch takes several optimizer steps: a check is due when the batch crossed a multiple
        def period(step):
            return (step - self.start_step) // self.every_n_steps if step >= self.start_step else -1

        step = trainer.global_step
        if period(step) > period(self._step_before):
            self.split_emptiest(trainer, pl_module, step)

    @torch.no_grad()
    def split_emptiest(self, trainer, pl_module, step: int) -> None:
        images = trainer.datamodule.training_images(self.max_images)
        features, assigned = self._encode(pl_module, images)
        k = pl_module.code_dim(pl_module.cluster_code)
        sizes = torch.bincount(assigned, minlength=k)
        target = int(sizes.argmin())
        if sizes[target] >= self.min_share * len(images) / k:
            return
        best = None
        for cluster in sizes.argsort(descending=True).tolist():
            members = assigned == cluster
            if members.sum() < 4:
                break
            side = two_means(features[members])
            if side.all() or not side.any():
                continue
            gain = scatter(features[members]) - scatter(features[members][side]) - scatter(features[members][~side])
            if best is None or gain > best[0]:
                best = (gain, cluster, members, side)
        if best is None:
            return
        _, source, members, side = best
        # the smaller half moves: the source keeps its larger part and its name
        moved = members.clone()
        moved[members] = side if side.sum() <= (~side).sum() else ~side
        kept = members & ~moved
        code = pl_module.cluster_code
        averaged = weight_average(trainer)
        modules = [pl_module] + ([averaged.averaged_module] if averaged is not None and averaged.averaged_module is not None else [])
        rows = pl_module.code_logit_rows(code).start
        for module in modules:
            module_features = features if module is pl_module else self._encode(module, images)[0]
            split_rows(module.encoder_output_layer(), rows + source, rows + target, module_features[kept].mean(0),
                       module_features[moved].mean(0), self.margin)
            for parameter, dim, offset in decoder_slices(module, code):
                copy_slice(parameter, dim, offset + source, offset + target)
        layer = pl_module.encoder_output_layer()
        for parameter, dim, offset in [(layer.weight, 0, rows), (layer.bias, 0, rows), *decoder_slices(pl_module, code)]:
            for optimizer in trainer.optimizers:
                for value in optimizer.state.get(parameter, {}).values():
                    if torch.is_tensor(value) and value.shape == parameter.shape:
                        copy_slice(value, dim, offset + source, offset + target)
        for term in pl_module.terms.values():
            term.forget()
        self.splits.append((step, source, target))
        pl_module.log("train/clusters_split", float(len(self.splits)), on_step=True, on_epoch=False)

    def _encode(self, module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        training = module.training
        module.eval()
        try:
            hidden, assigned = [], []
            for x in images.split(500):
                features, codes = module.encode_with_features(x.to(module.device))
                hidden.append(features)
                assigned.append(codes[module.cluster_code].argmax(1))
        finally:
            module.train(training)
        return torch.cat(hidden), torch.cat(assigned)
