import gzip
import shutil

import pytest
import torch

from aae_lightning import FashionMNISTDataModule, MNISTDataModule, SVHNDataModule
from aae_lightning.cli import cli_main
from aae_lightning.data import DataError, TensorBatches
from conftest import CONFIGS, write_idx_dataset


def test_mnist_torchvision_layout_shapes_range_and_split(mnist_dir):
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, batch_size=64, val_size=100)
    dm.setup("fit")
    x, y = dm.splits["train"]
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert dm.splits["val"][0].shape == (100, 1, 28, 28)
    assert set(y.unique().tolist()) == set(range(10))
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 500 // 64
    assert batches[0][0].shape == (64, 1, 28, 28) and batches[0][1].dtype == torch.int64
    dm.setup("test")
    assert dm.splits["test"][0].shape == (200, 1, 28, 28)


def test_fashion_flat_gzip_layout_as_debian_ships_it(fashion_dir):
    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), download=False, val_size=50)
    dm.setup("fit")
    assert dm.splits["train"][0].shape == (550, 1, 28, 28)


def test_uncompressed_idx_files_load_too(tmp_path):
    folder = write_idx_dataset(tmp_path / "plain", n_train=40, n_test=20, compress=False)
    dm = MNISTDataModule(data_dir=str(folder), download=False, val_size=10)
    dm.setup("fit")
    assert dm.splits["train"][0].shape == (30, 1, 28, 28)


def test_validation_split_is_seeded_and_disjoint(mnist_dir):
    def val_images(seed):
        dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=100, seed=seed)
        dm.setup("fit")
        return dm.splits["val"][0], dm.splits["train"][0]

    a, train_a = val_images(0)
    b, _ = val_images(0)
    c, _ = val_images(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # no validation image appears among the training images
    flat_train = train_a.flatten(1)
    assert not any((flat_train == v.flatten()).all(1).any() for v in a[:20])


def test_svhn_mat_files(svhn_dir):
    dm = SVHNDataModule(data_dir=str(svhn_dir), download=False, val_size=50)
    dm.setup("fit")
    x, y = dm.splits["train"]
    assert x.shape == (250, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y.min() == 0 and y.max() == 9  # label 10 of the .mat files is digit 0


def test_missing_files_name_the_files_and_where_to_put_them(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\].*nowhere.*MNIST/raw"):
        dm.setup("fit")


def test_failed_download_says_why_and_where_to_put_files(tmp_path, monkeypatch):
    # no network reaches the dataset mirrors from here or from CI
    dm = SVHNDataModule(data_dir=str(tmp_path / "svhn"), download=True)
    with pytest.raises(DataError, match=r"download failed.*put train_32x32.mat, test_32x32.mat in"):
        dm.setup("fit")


def test_truncated_idx_file_is_reported_with_its_path(tmp_path):
    folder = write_idx_dataset(tmp_path / "bad", n_train=40, n_test=20)
    images = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    dm = MNISTDataModule(data_dir=str(folder), download=False, val_size=10)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt"):
        dm.setup("fit")


def test_corrupt_gzip_and_bad_magic_are_reported(tmp_path):
    folder = write_idx_dataset(tmp_path / "bad", n_train=40, n_test=20)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:30])
    with pytest.raises(DataError, match=r"cannot read .*train-labels-idx1-ubyte.gz"):
        MNISTDataModule(data_dir=str(folder), download=False, val_size=10).setup("fit")
    labels.write_bytes(gzip.compress(b"\x01\x02\x03\x04garbage"))
    with pytest.raises(DataError, match=r"not an IDX file"):
        MNISTDataModule(data_dir=str(folder), download=False, val_size=10).setup("fit")


def test_corrupt_mat_file_is_reported(svhn_dir, tmp_path):
    folder = tmp_path / "svhn"
    shutil.copytree(svhn_dir, folder)
    (folder / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match=r"cannot read .*train_32x32.mat"):
        SVHNDataModule(data_dir=str(folder), download=False, val_size=10).setup("fit")


def test_wrong_image_shape_is_reported(svhn_dir):
    # SVHN's 32x32 files read as if they were 28x28 MNIST-shaped data
    dm = SVHNDataModule(data_dir=str(svhn_dir), download=False)
    dm.input_shape = (1, 28, 28)
    with pytest.raises(DataError, match=r"expected images of shape \(N, 1, 28, 28\)"):
        dm.setup("fit")


def test_tensor_batches_shard_one_permutation_across_processes():
    data = (torch.arange(103),)
    shards = [list(TensorBatches(data, 10, shuffle=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    seen = [torch.cat([b[0] for b in s]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 51
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    batches = TensorBatches(data, 10, shuffle=True, seed=3)
    first, second = (torch.cat([b[0] for b in batches]) for _ in range(2))
    assert not torch.equal(first, second) and sorted(first.tolist()) == list(range(103))


def test_tensor_batches_order_follows_the_trainers_epoch_and_the_pass_within_it():
    """Resumed at an epoch's end Lightning restores no loader state: a fresh loader told the epoch
    must hand out what the loader that lived through the earlier epochs would, the passes of a
    cycled small set included."""
    data = (torch.arange(20),)
    epoch = 0
    lived = TensorBatches(data, 4, shuffle=True, seed=3, current_epoch=lambda: epoch)
    seen = {}
    for epoch in range(3):
        seen[epoch] = [torch.cat([b[0] for b in lived]) for _ in range(3)]  # three passes an epoch
    assert not torch.equal(seen[2][0], seen[2][1]) and not torch.equal(seen[1][0], seen[2][0])
    epoch = 2
    fresh = TensorBatches(data, 4, shuffle=True, seed=3, current_epoch=lambda: epoch)
    assert all(torch.equal(torch.cat([b[0] for b in fresh]), seen[2][p]) for p in range(3))
    # without a trainer each pass is an epoch, and the first pass of each matches
    alone = TensorBatches(data, 4, shuffle=True, seed=3)
    assert [torch.equal(torch.cat([b[0] for b in alone]), seen[e][0]) for e in range(3)] == [True] * 3


def test_tensor_batches_resume_mid_epoch_and_start_a_new_epoch_otherwise():
    data = (torch.arange(20),)
    batches = TensorBatches(data, 4, shuffle=True, seed=3)
    epoch0 = [b[0] for b in batches]
    epoch1_start = iter(batches)
    first_two = [next(epoch1_start)[0] for _ in range(2)]
    state = batches.state_dict()

    resumed = TensorBatches(data, 4, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    rest = [b[0] for b in resumed]
    epoch1 = first_two + rest
    assert len(rest) == 3 and torch.equal(torch.cat(epoch1).sort().values, torch.arange(20))
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch0))  # a fresh permutation per epoch
    # a pass cut short (limit_train_batches) does not make the next pass continue it
    reference = TensorBatches(data, 4, shuffle=True, seed=3)
    [next(iter(reference)) for _ in range(1)]
    assert torch.equal(torch.cat([b[0] for b in reference]), torch.cat(epoch1))


def test_splits_on_device_stay_where_the_model_trains(mnist_dir, tmp_path, monkeypatch):
    """``on_device`` puts every split, the labelled subset too, on the trainer's device (the GPU
    where there is one), and training and prediction read them there."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIGS / "semi_supervised_mnist_100.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
                    "--data.val_size=100", "--data.on_device=true", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                    "--trainer.limit_val_batches=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                    "--trainer.enable_progress_bar=false"])
    device, dm = cli.trainer.strategy.root_device, cli.datamodule
    assert cli.trainer.current_epoch == 1 and set(dm.splits) == {"train", "val", "labeled"}
    assert {t.device for tensors in dm.splits.values() for t in tensors} == {device}
    # Lightning hands predictions back on the CPU
    index = torch.cat([out["index"] for out in cli.trainer.predict(cli.model, datamodule=dm)])
    assert index.tolist() == list(range(200))  # the fixture's 200 test images, in order
