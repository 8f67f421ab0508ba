"""The clustering config, unchanged but for data and budget, on data with an obvious cluster structure."""

import pytest

from aae_lightning.cli import cli_main
from conftest import CONFIGS, write_idx_dataset


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("templates"), n_train=3500, n_test=500, seed=11)


def test_clustering_config_purifies_clusters_on_structured_data(templates_dir):
    cli = cli_main(["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={templates_dir}",
                    "--data.download=false", "--data.val_size=500", "--trainer.max_epochs=12",
                    "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.callbacks=[]",
                    "--trainer.enable_checkpointing=false"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert metrics["val/purity"] > 0.9, {k: v.item() for k, v in metrics.items() if k.startswith("val/")}
    assert metrics["val/clusters_used"] >= 10
    (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    assert test["test/purity"] > 0.9
