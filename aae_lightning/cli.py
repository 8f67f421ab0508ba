"""``python -m aae_lightning fit|validate|test|predict --config FILE``: LightningCLI in omegaconf mode."""

import sys

import wandb
from lightning.pytorch.cli import LightningCLI

from aae_lightning.data import DataError, ImageDataModule
from aae_lightning.model import AdversarialAutoencoder, NonFiniteLossError
from aae_lightning.sweep import main as sweep_main
from aae_lightning.tracking import SaveConfigToRun, choose_wandb_mode, keep_checkpoints_local_offline


class AAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # The data decides the image shape and the number of classes; the model follows.
        parser.link_arguments("data", "model.init_args.input_shape", compute_fn=lambda d: d.input_shape, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.num_classes", compute_fn=lambda d: d.num_classes, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        keep_checkpoints_local_offline(trainer.loggers)
        return trainer


def cli_main(args=None, run: bool = True) -> AAECLI | None:
    """The CLI; with ``run=False`` it only builds model, data and trainer (for benchmarks).

    ``sweep FILE --count N`` runs a W&B sweep offline (see :mod:`aae_lightning.sweep`).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        sweep_main(argv[1:])
        return None
    choose_wandb_mode()
    try:
        return AAECLI(
            AdversarialAutoencoder,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            auto_configure_optimizers=False,
            parser_kwargs={"parser_mode": "omegaconf"},
            args=args,
            run=run,
        )
    except (DataError, NonFiniteLossError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        # close the run so a later cli_main in the same process starts its own, not reuses this one
        if run and wandb.run is not None:
            wandb.finish()
