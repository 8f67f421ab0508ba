"""Channels-last against contiguous (NCHW) feature maps in the conv encoders, alternating in one
process: the real fit path of each config (its nets, terms and callbacks, the Trainer, the MNIST
sample) for a few epochs with and without ``channels_last``, as seconds per training batch (its
three or four optimizer steps) and the ratio. Validation, checkpoints and the logger are off
(nothing is written): the training step is what the layout changes.

    python benchmarks/conv_layout.py --configs configs/clustering.yaml configs/semi_supervised_mnist_100.yaml
"""

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from aae_lightning.cli import cli_main

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-sample"


class BatchTimer(L.Callback):
    """When each training batch ends (per batch, not per ``trainer.global_step``, which counts each
    of a batch's optimizer steps)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())


def seconds_per_batch(config: str, channels_last: bool, epochs: int) -> float:
    cli = cli_main(["--config", config, f"--data.data_dir={SAMPLE}", "--data.val_size=500", "--data.download=false",
                    f"--trainer.max_epochs={epochs}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--model.init_args.figures_every_n_epochs=0",
                    f"--model.init_args.encoder.init_args.channels_last={channels_last}", "--seed_everything=0"], run=False)
    timer = BatchTimer()
    cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, Checkpoint)] + [timer]
    cli.trainer.fit(cli.model, cli.datamodule)
    # from the end of the first batch (set-up and warm-up before it) to the end of the last
    return (timer.ends[-1] - timer.ends[0]) / (len(timer.ends) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="configs whose encoder is a ConvEncoder or VGGEncoder")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the 2,000 training digits per timing (20 batches each)")
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    if not SAMPLE.is_dir():
        parser.error(f"{SAMPLE} is missing: it comes with the project's shared/ folder beside the checkout")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per training batch, best of {opts.repeats}")
    for config in opts.configs:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(opts.repeats):
            for layout in (False, True):
                times[layout].append(seconds_per_batch(config, layout, opts.epochs))
        contiguous, channels_last = min(times[False]), min(times[True])
        print(f"{config}: contiguous {contiguous:.4g} s, channels-last {channels_last:.4g} s "
              f"(median {statistics.median(times[False]):.4g} / {statistics.median(times[True]):.4g}); "
              f"channels-last / contiguous speed = {contiguous / channels_last:.2f}", flush=True)


if __name__ == "__main__":
    main()
