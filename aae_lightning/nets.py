"""Encoder, decoder and discriminator networks.

Encoders and decoders are configured as callables (``class_path`` + ``init_args`` without the
shape arguments) because their input/output sizes follow from the data and the latent codes.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn


class FullPrecision:
    """Mixin for a layer that computes in fp32 even under bf16 autocast (in fp32 runs it changes
    nothing). Each net's output layer: its outputs feed softmaxes, their logarithms and the losses,
    where bf16's 8-bit mantissa (logits 0.06 apart at 10) is noise; a K = 16 clustering lost 9 points
    of purity on one seed of three without it. Batch norms: their batch statistics and backward
    reductions in bf16 cost Fashion-MNIST 2.5 points of accuracy over three seeds
    (docs/experiments.md: "bf16 quality")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))  # the weights' own: fp32 under bf16-mixed, fp64 under 64-true


class FullPrecisionLinear(FullPrecision, nn.Linear):
    pass


class FullPrecisionConvTranspose2d(FullPrecision, nn.ConvTranspose2d):
    pass


class FullPrecisionBatchNorm1d(FullPrecision, nn.BatchNorm1d):
    pass


class FullPrecisionBatchNorm2d(FullPrecision, nn.BatchNorm2d):
    pass


def mlp(sizes: Sequence[int], dropout: float = 0.0, batch_norm: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last, which computes
    in fp32), optionally batch-normalised (in fp32) before each ReLU."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append((FullPrecisionLinear if last else nn.Linear)(n_in, n_out))
        if not last:
            if batch_norm:
                layers.append(FullPrecisionBatchNorm1d(n_out))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Sequential):
    """Flattened image -> raw code vector. The paper uses two hidden layers of 1000 ReLU units.

    ``batch_norm`` (beyond the paper) normalises each hidden layer over the batch; the clustering
    configs turn it on (README: with/without).
    """

    def __init__(self, input_shape: Sequence[int], out_dim: int, hidden: Sequence[int] = (1000, 1000), dropout: float = 0.0,
                 batch_norm: bool = False):
        super().__init__(nn.Flatten(), mlp([math.prod(input_shape), *hidden, out_dim], dropout, batch_norm))


class MLPDecoder(nn.Module):
    """Code vector -> image logits (the model applies the output non-linearity)."""

    def __init__(self, in_dim: int, output_shape: Sequence[int], hidden: Sequence[int] = (1000, 1000)):
        super().__init__()
        self.output_shape = tuple(output_shape)
        self.net = mlp([in_dim, *hidden, math.prod(output_shape)])

    def forward(self, codes):
        return self.net(codes).view(-1, *self.output_shape)


def check_blocks(net: str, input_shape: Sequence[int], channels: Sequence[int]) -> None:
    """A conv encoder halves the image once per entry of ``channels`` (the conv decoder doubles its
    maps as often): name what cannot be built rather than fail later with a shape error deep inside
    a layer."""
    if not channels or min(channels) < 1:
        raise ValueError(f"{net}: channels must be one or more positive widths, got {list(channels)}")
    side = 2 ** len(channels)
    if min(input_shape[1:]) < side:
        raise ValueError(f"{net}: {len(channels)} blocks need an image of at least {side}x{side} pixels, got "
                         f"{input_shape[1]}x{input_shape[2]}; give at most {int(math.log2(min(input_shape[1:])))} channels")


def code_head(features: int, hidden: int, out_dim: int) -> list[nn.Module]:
    """The conv encoders' last layers: flattened feature maps -> one hidden layer -> the raw codes
    (in fp32). The hidden layer is the input of the output layer, which ``encode_with_features``
    reads."""
    return [nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), FullPrecisionLinear(hidden, out_dim)]


class ConvNet(nn.Sequential):
    """A conv encoder's layers, run on feature maps stored channels-last (NHWC) unless
    ``channels_last`` is off: oneDNN's convolutions on CPUs and cuDNN's on GPUs are faster on that
    layout (docs/experiments.md: "Channels-last feature maps"). The results are the same up to the
    order of floating-point sums."""

    def __init__(self, *layers: nn.Module, channels_last: bool = True):
        super().__init__(*layers)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)


class ConvEncoder(ConvNet):
    """Strided-conv encoder (stride 2, batch-normalised) for 28x28 digits and 32x32 colour images
    (SVHN), where MLPs waste capacity on pixels and tie a code to where a stroke lies."""

    def __init__(self, input_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (64, 128, 256), hidden: int = 1000,
                 channels_last: bool = True):
        check_blocks("ConvEncoder", input_shape, channels)
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), FullPrecisionBatchNorm2d(c_out), nn.ReLU()]
            c, h, w = c_out, h // 2, w // 2
        super().__init__(*layers, *code_head(c * h * w, hidden, out_dim), channels_last=channels_last)


class VGGEncoder(ConvNet):
    """Blocks of ``convs_per_block`` 3x3 convolutions (batch-normalised), each block ending in a
    2x2 max-pool (VGG, Simonyan & Zisserman 2015). Several times the strided encoder's compute per
    image; on real digits it classifies better (docs/experiments.md: "A VGG encoder")."""

    def __init__(self, input_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (32, 64, 128), hidden: int = 500,
                 convs_per_block: int = 2, channels_last: bool = True):
        check_blocks("VGGEncoder", input_shape, channels)
        if convs_per_block < 1:
            raise ValueError(f"VGGEncoder: convs_per_block must be >= 1, got {convs_per_block}")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for c_out in channels:
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(c, c_out, 3, padding=1), FullPrecisionBatchNorm2d(c_out), nn.ReLU()]
                c = c_out
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        super().__init__(*layers, *code_head(c * h * w, hidden, out_dim), channels_last=channels_last)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: code vector -> image logits."""

    def __init__(self, in_dim: int, output_shape: Sequence[int], channels: Sequence[int] = (256, 128, 64), hidden: int = 1000):
        super().__init__()
        check_blocks("ConvDecoder", output_shape, channels)
        c_img, h, w = output_shape
        scale = 2 ** len(channels)
        if h % scale or w % scale:
            # each block doubles the maps, so the image's sides must be the start's times 2 ** blocks
            fits = max(n for n in range(len(channels)) if h % 2 ** n == 0 and w % 2 ** n == 0)
            advice = f"give at most {fits} channels" if fits else "an odd side needs the MLPDecoder"
            raise ValueError(f"ConvDecoder: {len(channels)} blocks cannot draw a {h}x{w} image (they would draw "
                             f"{h // scale * scale}x{w // scale * scale}); {advice}")
        self.start_shape = (channels[0], h // scale, w // scale)
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(self.start_shape)), nn.ReLU()]
        self.fc = nn.Sequential(*layers)
        ups: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            ups += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), FullPrecisionBatchNorm2d(c_out), nn.ReLU()]
        self.deconv = nn.Sequential(*ups, FullPrecisionConvTranspose2d(channels[-1], c_img, 4, stride=2, padding=1))

    def forward(self, codes):
        return self.deconv(self.fc(codes).view(-1, *self.start_shape))


class Discriminator(nn.Module):
    """MLP deciding whether a code vector came from the prior (logit > 0) or the encoder."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (1000, 1000)):
        super().__init__()
        self.net = mlp([in_dim, *hidden, 1])

    def forward(self, code):
        return self.net(code).squeeze(1)
