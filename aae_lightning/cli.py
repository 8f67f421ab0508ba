"""``python -m aae_lightning fit|validate|test|predict --config FILE``: LightningCLI in omegaconf mode."""

import sys

import wandb
from lightning.pytorch.cli import LightningCLI

from aae_lightning.checkpointing import CheckpointError, check_matches, find_last_checkpoint, load_checkpoint
from aae_lightning.data import DataError, ImageDataModule
from aae_lightning.model import AdversarialAutoencoder, NonFiniteLossError
from aae_lightning.tracking import (
    SaveConfigToRun,
    checkpoint_wandb_run_id,
    choose_wandb_mode,
    continue_wandb_run,
    keep_checkpoints_local_offline,
)


class AAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # The data decides the image shape and the number of classes; the model follows.
        parser.link_arguments("data", "model.init_args.input_shape", compute_fn=lambda d: d.input_shape, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.num_classes", compute_fn=lambda d: d.num_classes, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        keep_checkpoints_local_offline(trainer.loggers)
        return trainer

    def parse_arguments(self, parser, args):
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyperparameters right after parsing; refuse a bad
        # file here with one line instead of a traceback from torch.load
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._checkpoint = load_checkpoint(ckpt_path) if ckpt_path and ckpt_path != "last" else None

    def _prepare_checkpoint(self) -> None:
        """Resolves ``--ckpt_path`` (``last``: the newest last.ckpt of earlier runs), checks the file
        against the model before Lightning restores it, and for ``fit`` continues the W&B run it
        came from."""
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            found = find_last_checkpoint(self.trainer)
            if found is None and self.subcommand == "fit":
                print("resume: no last.ckpt from an earlier run was found; starting from scratch")
                config.ckpt_path = None
                return
            if found is None:
                raise CheckpointError(f"{self.subcommand}: --ckpt_path last found no last.ckpt from an earlier run")
            print(f"{self.subcommand}: --ckpt_path last is {found}")
            ckpt_path = config.ckpt_path = str(found)
            self._checkpoint = load_checkpoint(found)
        check_matches(self._checkpoint, self.model, ckpt_path)
        if self.subcommand == "fit":
            continue_wandb_run(self.trainer.loggers, checkpoint_wandb_run_id(self._checkpoint))

    before_fit = before_validate = before_test = before_predict = _prepare_checkpoint


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps a constructor's ValueError in a many-line
    union-type error whose context is the constructor's own one-line message."""
    while True:
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            return err
        err = inner


def cli_main(args=None, run: bool = True) -> AAECLI | None:
    """The CLI; with ``run=False`` it only builds model, data and trainer (for benchmarks).

    ``sweep FILE --count N`` runs a W&B sweep offline (see :mod:`aae_lightning.sweep`).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        from aae_lightning.sweep import main as sweep_main  # the sweep engine is needed only here

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
    except (DataError, NonFiniteLossError, CheckpointError, ValueError) as err:
        print(f"error: {root_cause(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        # close the run so a later cli_main in the same process starts its own, not reuses this one
        if run and wandb.run is not None:
            wandb.finish()
