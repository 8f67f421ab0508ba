"""The clustering config, unchanged but for data and budget, on data with an obvious cluster structure."""

import pytest

from aae_lightning.cli import cli_main
from conftest import BLOBS_NOT_STROKES, CONFIGS, ONLY_THE_WEIGHT_AVERAGE, write_idx_dataset

QUIET = ["--data.download=false", "--data.val_size=500", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
         *ONLY_THE_WEIGHT_AVERAGE, "--trainer.enable_checkpointing=false", "--model.init_args.figures_every_n_epochs=0"]
# the paper's method alone: its plain MLP encoder, no extra training terms, the digits as they are
PAPER = ["--model.init_args.terms={}", "--model.init_args.encoder=aae_lightning.nets.MLPEncoder", "--data.init_args.transform=null"]


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("templates"), n_train=3500, n_test=500, seed=11)


@pytest.fixture(scope="module")
def shifted_templates_dir(tmp_path_factory):
    """The same ten templates shifted by up to 4 pixels: k-means on the pixels finds clusters only
    0.67 pure, as position hides the shape."""
    return write_idx_dataset(tmp_path_factory.mktemp("shifted"), n_train=3500, n_test=500, seed=11, max_shift=4)


def fit(data_dir, *args):
    cli = cli_main(["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={data_dir}", "--trainer.max_epochs=12",
                    *BLOBS_NOT_STROKES, *QUIET, *args], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def test_clustering_config_purifies_clusters_on_structured_data(templates_dir):
    # 0.8, not 1.0: in these 12 epochs the paired term merges templates (IIC's weight: purity 0.90,
    # 12 of 16 clusters used; the config's marginal_weight 0.75: 0.83, 9 used; with the style code's
    # instance contrast 0.826, 8 used; docs/experiments.md), the price of +5, +4 and +2 points of
    # purity on real digits
    cli = fit(templates_dir)
    metrics = cli.trainer.callback_metrics
    assert metrics["val/purity"] > 0.8, {k: v.item() for k, v in metrics.items() if k.startswith("val/")}
    assert metrics["val/clusters_used"] >= 8
    (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    assert test["test/purity"] > 0.8


# two 12-epoch fits, the suite's longest test: `make test-slow`
@pytest.mark.slow
def test_clustering_config_finds_the_shapes_that_the_papers_method_alone_misses(shifted_templates_dir):
    ours = fit(shifted_templates_dir).trainer.callback_metrics
    paper = fit(shifted_templates_dir, *PAPER).trainer.callback_metrics
    summary = {name: {k: round(v.item(), 3) for k, v in m.items() if k.startswith("val/")} for name, m in (("ours", ours), ("paper", paper))}
    # ours 0.746-0.754 over thread counts, with or without the shared perturbed copy (0.84 in the
    # prototype runs), the paper's 0.62; 16 epochs give 0.758 / 0.602 (docs/experiments.md)
    assert ours["val/purity"] > 0.72 and paper["val/purity"] < 0.68, summary
    assert ours["val/purity"] > paper["val/purity"] + 0.1 and ours["val/nmi"] > paper["val/nmi"] + 0.05, summary
