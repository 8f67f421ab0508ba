"""In-memory image DataModules: each split is read once, scaled once, and batched by index.

Per-sample PIL transforms cost more than the model at MNIST scale, so nothing here goes through
a torchvision ``Dataset.__getitem__``; torchvision is used for what it is good at here, the
download.
"""

import gzip
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torchvision

from aae_lightning.transforms import ImageTransform

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """Data files are missing, truncated or malformed; the message says which and where they go."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or gzipped, checking its header against its size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path}: {err} (the file is corrupt or truncated; replace it)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); replace it with the original file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header incomplete); replace it with the original file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes) "
            f"but it holds {len(raw) - header} bytes; replace it with the original file"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


class TensorBatches:
    """Iterates over index batches of in-memory tensors: the whole data path is one gather per batch.

    Under DDP each process takes its own strided shard of the same seeded permutation. The order is
    a function of the seed, the epoch and the pass within it (a small set cycled beside a large one
    is passed over several times an epoch): each epoch seeds a generator that draws one permutation
    per pass. The epoch comes from ``current_epoch`` (the trainer's, given by the DataModule), else
    each pass counts as an epoch. The position in the pass is part of checkpoints (Lightning saves
    ``state_dict`` of a loader that has one), so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run would have; resumed at an epoch's end, Lightning restores no loader state and
    the trainer's epoch alone gives the next epoch's order.
    """

    def __init__(self, tensors, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 equal_shards: bool = True, current_epoch: Callable[[], int] | None = None):
        self.tensors = tensors
        # every rank the same number of examples, the remainder left out: ranks that synchronise
        # per batch (training, metrics) must run the same number of batches; prediction takes all
        self.equal_shards = equal_shards
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.current_epoch = current_epoch
        self.epoch = 0
        self.passes = 0  # passes of this epoch begun before the current one
        self.position = 0  # batches of the current pass already handed out
        self._restored = False
        self._drawn = (None, None, 0, None)  # (epoch, its generator: one permutation per pass, passes drawn, the last one)

    def _num_samples(self) -> int:
        n = len(self.tensors[0])
        return n // self.world_size if self.equal_shards else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.passes, self.position = state["epoch"], state.get("passes", 0), state["position"]
        self._restored = True

    def _start_pass(self) -> None:
        # a restored position inside a pass continues it; otherwise a new epoch starts with its first
        # pass, or the epoch goes on with its next pass
        restored, self._restored = self._restored, False
        if restored and self.position < len(self):
            return
        epoch = self.current_epoch() if self.current_epoch is not None else self.epoch + (self.position > 0)
        if epoch != self.epoch:
            self.epoch, self.passes = epoch, 0
        elif self.position > 0:
            self.passes += 1
        self.position = 0

    def _order(self) -> torch.Tensor:
        n = len(self.tensors[0])
        if not self.shuffle:
            return torch.arange(n)
        epoch, generator, drawn, order = self._drawn
        if epoch != self.epoch or drawn > self.passes + 1:
            generator, drawn = torch.Generator().manual_seed(self.seed + self.epoch), 0
        while drawn <= self.passes:
            order, drawn = torch.randperm(n, generator=generator), drawn + 1
        self._drawn = (self.epoch, generator, drawn, order)
        return order

    def __iter__(self):
        self._start_pass()
        # on the tensors' device: a gather there needs no index copied from the host each batch
        order = self._order()[self.rank :: self.world_size][: self._num_samples()].to(self.tensors[0].device)
        for i in range(self.position, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            self.position = i + 1
            yield tuple(t[idx] for t in self.tensors)


class ImageDataModule(L.LightningDataModule):
    """Base for the in-memory image DataModules.

    Args:
        data_dir: where the dataset's files are (see each subclass for the accepted layouts).
        download: download with torchvision when the files are missing (needs a network).
        batch_size: training and evaluation batch size.
        val_size: number of training images held out, by a seeded split, for validation.
        seed: seed of the validation split, the labelled subset and the shuffling.
        num_labeled: semi-supervised training: only this many training images keep their label,
            the same number per class, drawn (seeded) from the training split, so never from
            validation. Training batches are then {"all": (images, labels with -1 where hidden),
            "labeled": (images, labels)}, the small labelled set cycling beside the whole set.
        predict_split: the split ``predict`` encodes (``test``, ``val`` or ``train``).
        transform: opt-in, beyond the paper: a deterministic transform (or a list of them, applied
            in order) applied once to every split as it is loaded (e.g. :class:`~aae_lightning.Deskew`),
            so training, metrics, figures and predictions all see the transformed images.
        on_device: keep every split in the memory of the device the trainer trains on (a GPU), so
            that a batch is a gather there rather than a copy from the host each step. The splits
            must fit (MNIST's 70,000 images take 0.2 GB); without a trainer, or on a CPU, it changes nothing.
    """

    name: str = ""
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 100, val_size: int = 5000, seed: int = 0,
                 num_labeled: int | None = None, predict_split: Literal["train", "val", "test"] = "test",
                 transform: ImageTransform | list[ImageTransform] | None = None, on_device: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        if num_labeled is not None and (num_labeled < self.num_classes or num_labeled % self.num_classes):
            raise ValueError(f"{type(self).__name__}: num_labeled must be a positive multiple of the {self.num_classes} classes "
                             f"(the same number per class), got {num_labeled}")
        if val_size < 0:
            raise ValueError(f"{type(self).__name__}: val_size must be >= 0, got {val_size}")
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_labeled = num_labeled
        self.predict_split = predict_split
        self.transform = transform
        self.on_device = on_device
        # checkpoints keep the settings, the transform among them, so that the images a model was
        # trained on load again as they were: MNISTDataModule.load_from_checkpoint(path, data_dir=...)
        self.save_hyperparameters(logger=False)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # each split's rows as positions in the file it was read from (train and val share one)
        self.source_index: dict[str, torch.Tensor] = {}

    def load_split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images as uint8 (N, C, H, W) and integer labels (N,)."""
        raise NotImplementedError

    def _to_tensors(self, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape or len(images) != len(labels):
            raise DataError(
                f"{self.name} in {self.data_dir}: expected images of shape (N, {', '.join(map(str, self.input_shape))}) "
                f"and N labels, got images {tuple(images.shape)} and {len(labels)} labels"
            )
        images = torch.from_numpy(images.astype(np.float32) / 255.0)
        if self.transform is not None:
            for transform in self.transform if isinstance(self.transform, list) else [self.transform]:
                images = transform(images)
        return images, torch.from_numpy(labels.astype(np.int64))

    def prepare_data(self):
        # Only where files are missing and downloading is allowed; runs on one process per node.
        if self.download:
            self.find_files()

    def setup(self, stage: str):
        wanted = {"fit": "train", "validate": "val", "test": "test", "predict": self.predict_split}[stage]
        if wanted in ("train", "val") and "train" not in self.splits:
            images, labels = self._to_tensors(*self.load_split(train=True))
            if self.val_size >= len(images):
                raise ValueError(f"{type(self).__name__}: val_size={self.val_size} leaves no training data ({len(images)} images); "
                                 f"give a --data.val_size below {len(images)}")
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
            self.source_index["val"], self.source_index["train"] = order[: self.val_size], order[self.val_size :]
            for split in ("train", "val"):
                self.splits[split] = (images[self.source_index[split]], labels[self.source_index[split]])
            if self.num_labeled is not None:
                self._hide_labels()
        if wanted == "test" and "test" not in self.splits:
            self.splits["test"] = self._to_tensors(*self.load_split(train=False))
            self.source_index["test"] = torch.arange(len(self.splits["test"][0]))
        if self.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.splits = {name: tuple(t.to(device) for t in tensors) for name, tensors in self.splits.items()}

    def example_names(self, split: str) -> list[str] | None:
        """Names (e.g. file names) of the rows of the file ``split`` was read from, by position in
        that file, where the data has them; None otherwise."""
        return None

    def labeled_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """Indices of ``num_labeled`` training images, the same number per class, seeded."""
        if self.num_labeled > len(labels):
            raise ValueError(f"{type(self).__name__}: num_labeled={self.num_labeled} is larger than the training split ({len(labels)} images)")
        per_class = self.num_labeled // self.num_classes
        gen = torch.Generator().manual_seed(self.seed + 1)
        chosen = []
        for cls in range(self.num_classes):
            members = (labels == cls).nonzero().squeeze(1)
            if len(members) < per_class:
                raise ValueError(f"{type(self).__name__}: num_labeled={self.num_labeled} needs {per_class} images of class {cls}, "
                                 f"but the training split ({len(labels)} images) has {len(members)}")
            chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
        return torch.cat(chosen).sort().values

    def _hide_labels(self) -> None:
        images, labels = self.splits["train"]
        idx = self.labeled_indices(labels)
        self.splits["labeled"] = (images[idx], labels[idx])
        hidden = torch.full_like(labels, -1)
        hidden[idx] = labels[idx]
        self.splits["train"] = (images, hidden)

    def _batches(self, split: str, shuffle: bool, predict: bool = False) -> TensorBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batch_size = max(1, min(self.batch_size, len(self.splits[split][0]) // world))
        images, labels = self.splits[split]
        tensors = (images, labels, self.source_index[split].to(images.device)) if predict else (images, labels)
        current_epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        return TensorBatches(tensors, batch_size, shuffle, self.seed, drop_last=shuffle, rank=rank, world_size=world, equal_shards=not predict,
                             current_epoch=current_epoch)

    def train_dataloader(self):
        if "labeled" in self.splits:
            # Lightning combines a dict of loaders ("max_size_cycle"): the labelled set cycles
            return {"all": self._batches("train", shuffle=True), "labeled": self._batches("labeled", shuffle=True)}
        return self._batches("train", shuffle=True)

    def training_images(self, n: int) -> torch.Tensor:
        """The first ``n`` training images, for callbacks that read the training set without its
        labels (``MergedClusters``, ``ClusterSplit``)."""
        self.setup("fit")
        return self.splits["train"][0][:n]

    def val_dataloader(self):
        return self._batches("val", shuffle=False)

    def test_dataloader(self):
        return self._batches("test", shuffle=False)

    def predict_dataloader(self):
        # batches of (images, labels, each row's position in its file)
        return self._batches(self.predict_split, shuffle=False, predict=True)

    def find_files(self):
        raise NotImplementedError


class IDXDataModule(ImageDataModule):
    """MNIST-format datasets: the four IDX files, plain or gzipped, either directly in ``data_dir``
    (as Debian's dataset packages ship them) or in torchvision's ``data_dir/<Name>/raw`` layout."""

    torchvision_class: type = torchvision.datasets.MNIST
    files = {
        (True, "images"): "train-images-idx3-ubyte",
        (True, "labels"): "train-labels-idx1-ubyte",
        (False, "images"): "t10k-images-idx3-ubyte",
        (False, "labels"): "t10k-labels-idx1-ubyte",
    }

    def _candidate_dirs(self) -> list[Path]:
        return [self.data_dir, self.data_dir / self.torchvision_class.__name__ / "raw"]

    def _locate(self) -> dict[tuple[bool, str], Path] | None:
        for folder in self._candidate_dirs():
            found = {}
            for key, stem in self.files.items():
                path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
                if path is None:
                    break
                found[key] = path
            else:
                return found
        return None

    def find_files(self) -> dict[tuple[bool, str], Path]:
        found = self._locate()
        if found is None and self.download:
            try:
                self.torchvision_class(root=str(self.data_dir), download=True)
            except Exception as err:  # torchvision raises URLError, RuntimeError, ... when offline
                reason = f"download failed: {type(err).__name__}: {err}".splitlines()[0]
            else:
                reason = "download finished but the files are still missing"
            found = self._locate()
        else:
            reason = "download=false"
        if found is None:
            names = ", ".join(f"{stem}[.gz]" for stem in self.files.values())
            where = " or ".join(str(d) for d in self._candidate_dirs())
            raise DataError(f"{self.name} files not found ({reason}): put {names} in {where}")
        return found

    def load_split(self, train):
        found = self.find_files()
        images = read_idx(found[(train, "images")])
        labels = read_idx(found[(train, "labels")])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{found[(train, 'images')]} and {found[(train, 'labels')]} do not match: "
                f"images {images.shape}, labels {labels.shape}"
            )
        return images[:, None], labels


class MNISTDataModule(IDXDataModule):
    """MNIST digits, 1x28x28 in [0, 1]."""

    name = "MNIST"


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST, 1x28x28 in [0, 1]. Debian's ``dataset-fashion-mnist`` installs it under
    /usr/share/datasets/fashion-mnist."""

    name = "FashionMNIST"
    torchvision_class = torchvision.datasets.FashionMNIST


class SVHNDataModule(ImageDataModule):
    """SVHN house numbers, 3x32x32 in [0, 1]: ``train_32x32.mat`` and ``test_32x32.mat`` in
    ``data_dir`` (torchvision's layout). The label 10 of the original files is digit 0."""

    name = "SVHN"
    input_shape = (3, 32, 32)
    files = {True: "train_32x32.mat", False: "test_32x32.mat"}

    def find_files(self) -> dict[bool, Path]:
        paths = {train: self.data_dir / name for train, name in self.files.items()}
        reason = "download=false"
        for train, path in paths.items():
            if not path.is_file() and self.download:
                try:
                    torchvision.datasets.SVHN(root=str(self.data_dir), split="train" if train else "test", download=True)
                    reason = "download finished but the files are still missing"
                except Exception as err:  # offline: URLError and friends
                    reason = f"download failed: {type(err).__name__}: {err}".splitlines()[0]
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(f"SVHN files not found ({reason}): put {', '.join(p.name for p in missing)} in {self.data_dir}")
        return paths

    def load_split(self, train):
        import scipy.io

        path = self.find_files()[train]
        try:
            mat = scipy.io.loadmat(str(path))
            images, labels = mat["X"], mat["y"]
        except Exception as err:  # scipy raises ValueError, TypeError, KeyError ... on bad files
            raise DataError(f"cannot read {path}: {type(err).__name__}: {err} (corrupt or truncated; replace it)") from None
        if images.ndim != 4:
            raise DataError(f"{path}: expected X of shape (32, 32, 3, N), got {images.shape}")
        labels = labels.reshape(-1).astype(np.int64) % 10
        return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def scan_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes) of a folder of images: flat (labels -1, no classes) or one
    subfolder per class (torchvision's ``ImageFolder`` layout, found with its own helpers)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist: put your PNG/JPEG images there, "
                        "directly or one subfolder per class")
    flat = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    has_subfolders = any(p.is_dir() for p in folder.iterdir())
    if flat and has_subfolders:
        raise DataError(f"{folder} holds both images and subfolders: put every image directly in it (no labels), "
                        "or every image in a subfolder named after its class")
    if flat:
        return flat, [-1] * len(flat), []
    if has_subfolders:
        classes, class_to_idx = find_classes(str(folder))
        try:
            samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as err:  # a class subfolder without images
            raise DataError(f"{folder}: {err}") from None
        return [Path(p) for p, _ in samples], [label for _, label in samples], classes
    raise DataError(f"image folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}), directly or in class subfolders")


class ImageFolderDataModule(ImageDataModule):
    """Your own images: a folder of PNG/JPEG files, read once, converted to ``channels`` x
    ``image_size`` and held in memory like the other DataModules.

    The folder is flat (no labels: the metrics that need labels are skipped, the figures still
    drawn) or one subfolder per class (torchvision's ``ImageFolder`` layout): the labels then
    only score the clusters, they never train them (unless ``num_labeled`` is set).

    Args:
        data_dir: the folder of training images; ``val_size`` of them are held out for validation.
        channels: 1 (grey) or 3 (RGB); every image is converted to it.
        image_size: [height, width] every image is resized to; default: the size they all share
            (images of different sizes are then an error that says so).
        test_dir: a folder of the same layout for ``test`` and ``predict``; default every image
            of ``data_dir``, so ``predict`` assigns a cluster to each of them.
        val_size: default a tenth of the images.
    """

    name = "image folder"

    def __init__(self, data_dir: str, channels: int = 1, image_size: tuple[int, int] | None = None, test_dir: str | None = None,
                 batch_size: int = 100, val_size: int | None = None, seed: int = 0, num_labeled: int | None = None,
                 predict_split: Literal["train", "val", "test"] = "test"):
        if channels not in (1, 3):
            raise ValueError(f"ImageFolderDataModule: channels must be 1 (grey) or 3 (RGB), got {channels}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"ImageFolderDataModule: image_size must be [height, width], got {image_size}")
        self.folders = {True: Path(data_dir).expanduser(), False: Path(test_dir or data_dir).expanduser()}
        self.scans = {train: scan_image_folder(folder) for train, folder in self.folders.items()}
        files, _, classes = self.scans[True]
        if self.scans[False][2] != classes:
            raise DataError(f"{self.folders[False]} has classes {self.scans[False][2]} but {self.folders[True]} has {classes}")
        self.resize = image_size is not None
        if image_size is None:
            with self._open(files[0]) as first:
                image_size = (first.height, first.width)
        self.channels, self.image_size = channels, tuple(image_size)
        self.input_shape = (channels, *self.image_size)
        self.num_classes = len(classes)
        super().__init__(data_dir, False, batch_size, max(1, len(files) // 10) if val_size is None else val_size, seed, num_labeled, predict_split)

    @staticmethod
    def _open(path: Path):
        from PIL import Image, UnidentifiedImageError

        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read image {path}: {err} (not an image, or corrupt; remove or replace it)") from None

    def load_split(self, train):
        from PIL import Image

        files, labels, _ = self.scans[train]
        height, width = self.image_size
        images = np.empty((len(files), self.channels, height, width), dtype=np.uint8)
        for i, path in enumerate(files):
            with self._open(path) as image:
                if image.size != (width, height) and not self.resize:
                    raise DataError(f"{path} is {image.width}x{image.height} pixels but {files[0]} is {width}x{height}: "
                                    "set image_size: [height, width] in the DataModule to resize every image")
                try:
                    image = image.convert("L" if self.channels == 1 else "RGB")
                    pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR) if self.resize else image)
                except OSError as err:  # a truncated file fails only when its pixels are decoded
                    raise DataError(f"cannot read image {path}: {err} (corrupt or truncated; remove or replace it)") from None
            images[i] = pixels[None] if self.channels == 1 else pixels.transpose(2, 0, 1)
        return images, np.asarray(labels, dtype=np.int64)

    def example_names(self, split):
        folder = self.folders[split != "test"]
        return [str(p.relative_to(folder)) for p in self.scans[split != "test"][0]]


def require_image_datamodule(trainer, who: str) -> None:
    """One line for a callback that reads the training images and was given other data."""
    if not isinstance(trainer.datamodule, ImageDataModule):
        raise ValueError(f"{who}: needs one of aae_lightning's DataModules, whose training images it reads")
