"""``python -m aae_lightning fit|validate|test|predict --config FILE``: LightningCLI in omegaconf mode."""

import logging
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager

import wandb
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from aae_lightning.checkpointing import (CHECKPOINT_NAMES, CheckpointError, check_ckpt_path, check_matches, find_last_checkpoint, load_checkpoint,
                                         named_checkpoint, upgrade_hyperparameters)
from aae_lightning.config_files import expand_extends
from aae_lightning.data import DataError, ImageDataModule
from aae_lightning.model import AdversarialAutoencoder, NonFiniteLossError
from aae_lightning.precision import choose_precision
from aae_lightning.predictions import PredictionWriter
from aae_lightning.runs import RunSummary
from aae_lightning.tracking import (
    SaveConfigToRun,
    announce_offline,
    checkpoint_wandb_run_id,
    choose_wandb_mode,
    continue_wandb_run,
    drop_deprecated_wandb_settings,
    keep_checkpoints_local_offline,
    make_wandb_save_dirs,
)


def quiet_known_noise() -> None:
    """Silence what every start printed and a user can do nothing about: each for its reason."""
    # Lightning 2.6 calls torch's LeafSpec, which torch 2.14 deprecates: fixed in Lightning, not here
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # torchmetrics' NMI counts its contingency table with a sparse tensor; torch warns on each one
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    # validate/test/predict from a checkpoint restore ModelCheckpoint's state into the new run's
    # folder, where they write nothing
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    # validate/test/predict from a checkpoint of a weight-averaged run: its state_dict already holds
    # the average, which is what should be evaluated
    warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback, but loading a checkpoint outside")
    # validate/test/predict from a checkpoint of a fit with --trainer.max_time: the Timer's state
    # (the time the fit had left) means nothing to them
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`.*: \['Timer'\]\.$")
    # predict's rows carry their dataset index (our loaders batch by index, without a sampler)
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")
    # manual optimization + every_n_train_steps: Lightning offers to save the weights from before
    # the step; a resumable checkpoint wants them after it, as they are
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # the figures verb hands the CLI the arguments it does not take itself, not sys.argv
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    # the model summary counts parameters in 32 bits under bf16 autocast, which is right: they are fp32
    warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
    # Lightning 2.6 advertises its hosted logger at every start; this project logs to W&B
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())


# What every run needs, on without being written in each experiment YAML; a config or the command
# line still changes or removes each (``--trainer.callbacks=[]``, ``--trainer.logger=false``), and
# ``--print_config`` shows them. The figures follow from the model (its ``configure_callbacks``).
RUN_DEFAULTS = {
    # reproducible unless asked otherwise (--seed_everything=true draws a seed)
    "seed_everything": 0,
    "trainer.logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "aae-lightning", "save_dir": "runs"}},
    "trainer.plugins": [{"class_path": "aae_lightning.AtomicCheckpointIO"}],
    "trainer.log_every_n_steps": 10,
    "trainer.callbacks": [
        {"class_path": "aae_lightning.InterruptCheckpoint"},
        {"class_path": "aae_lightning.BestCheckpoint"},
        # last.ckpt also every 1500 optimizer steps (500 batches: each batch steps three
        # optimizers), so a preempted run loses minutes at most; resume with --ckpt_path last
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1500, "enable_version_counter": False}},
    ],
}


class AAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.set_defaults(RUN_DEFAULTS)
        # The data decides the image shape and the number of classes; the model follows.
        parser.link_arguments("data", "model.init_args.input_shape", compute_fn=lambda d: d.input_shape, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.num_classes", compute_fn=lambda d: d.num_classes, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("precision") is None:
            precision, why = choose_precision(config.get("accelerator", "auto"))
            kwargs["precision"] = precision
            rank_zero_info(f"precision: {precision}, as {why} (--trainer.precision=32-true or bf16-mixed forces either)")
        else:
            rank_zero_info(f"precision: {config['precision']}, as the config asks")
        if config.get("enable_checkpointing") is False:
            # no checkpoints means none: the ModelCheckpoints (the run defaults' among them), which
            # Lightning refuses beside the flag, leave; InterruptCheckpoint then saves nothing either
            callbacks = config.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs["callbacks"] = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        trainer = super().instantiate_trainer(**kwargs)
        announce_offline(trainer.loggers)
        keep_checkpoints_local_offline(trainer.loggers)
        drop_deprecated_wandb_settings(trainer.loggers)
        make_wandb_save_dirs(trainer.loggers)
        # every run ends with a summary, and predict writes its rows to a file
        present = {type(cb) for cb in trainer.callbacks}
        trainer.callbacks.extend(cb() for cb in (RunSummary, PredictionWriter) if cb not in present)
        return trainer

    def parse_arguments(self, parser, args):
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            # a config that extends another is read as the chain of configs it names
            argv = expand_extends(sys.argv[1:] if args is None else list(args))
            try:
                self.config = parser.parse_args(argv)
            except ArgumentError as err:
                raise ArgumentError(None, unknown_code_message(parser, argv, str(err)) or str(err)) from err
        # LightningCLI reads the checkpoint's hyperparameters right after parsing; refuse a bad
        # file here with one line instead of a traceback from torch.load
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_ckpt_path(ckpt_path, subcommand)
        self._checkpoint = load_checkpoint(ckpt_path) if ckpt_path and ckpt_path not in CHECKPOINT_NAMES else None

    def _parse_ckpt_path(self) -> None:
        """Lightning's: the hyperparameters a checkpoint saved override the config's. It reads them
        from the checkpoint ``parse_arguments`` loaded (weights only, once), upgraded to today's
        layout, where Lightning would read the file again as it is."""
        subcommand = self.config.get("subcommand")
        hparams = upgrade_hyperparameters(dict((self._checkpoint or {}).get("hyper_parameters") or {}))
        hparams.pop("_instantiator", None)
        if not subcommand or not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def _prepare_checkpoint(self) -> None:
        """Resolves ``--ckpt_path`` (``last`` / ``best``: the newest earlier run's last.ckpt / best
        checkpoint), checks the file against the model before Lightning restores it, and for ``fit``
        continues the W&B run it came from. Evaluating without a checkpoint is said aloud: a new
        process's model has the config's untrained weights."""
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            if self.subcommand != "fit":
                print(f"{self.subcommand}: no --ckpt_path, so these are untrained weights; give a checkpoint file, `best` or `last`")
            return
        if ckpt_path == "last" and self.subcommand == "fit" and find_last_checkpoint(self.trainer) is None:
            print("resume: no last.ckpt from an earlier run was found; starting from scratch")
            config.ckpt_path = None
            return
        if ckpt_path in CHECKPOINT_NAMES:
            found = named_checkpoint(self.trainer, ckpt_path, self.subcommand)
            print(f"{self.subcommand}: --ckpt_path {ckpt_path} is {found}")
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


def parse_error_line(message: str) -> str:
    """jsonargparse's message in one line. A value that no type of a key takes gets one line per
    type tried, nested per class_path; what a user needs is the key, the deepest refusal that is not
    "Expected a NoneType" (it names the option or the type) and, for a type, the value given."""
    lines = message.splitlines()
    if len(lines) == 1:
        return message
    refusals = [line for line in lines if line.startswith("    ") and "NoneType" not in line]
    deepest = max(refusals, key=lambda line: len(line) - len(line.lstrip()), default="")
    given = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("Given value:")), "")
    refusal = deepest.strip().removeprefix("- ")
    line = ": ".join(part for part in (lines[0].rstrip(":"), refusal) if part)
    return f"{line}, given {given!r}" if given and refusal.startswith("Expected") else line


CODE_OVERRIDE = re.compile(r"--model\.(?:init_args\.)?codes\.([^.=]+)(\.[^=]*)?=")


def unknown_code_message(parser, argv: list[str], message: str) -> str | None:
    """The message for an override of a code the configs do not have (``--model.codes.y.prior.
    num_classes=30`` where there is only z), or None. jsonargparse reads it as a new code whose
    prior has no class, and refuses the option with "Option 'num_classes' is not accepted"."""
    if "is not accepted" not in message:
        return None
    overrides = [(m.group(1), m.group(2) or "", arg) for arg in argv if (m := CODE_OVERRIDE.match(arg))]
    # a code the override itself creates (its prior's class given) is not unknown
    created = {name for name, key, _ in overrides if key in ("", ".prior", ".prior.class_path")}
    try:
        # the configs alone (--print_config would print them and exit)
        config = parser.parse_args([arg for arg in argv if not CODE_OVERRIDE.match(arg) and not arg.startswith("--print_config")])
    except ArgumentError:
        return None
    subcommand = config.get("subcommand")
    codes = (config[subcommand] if subcommand else config).get("model.init_args.codes") or {}
    for name, _, arg in overrides:
        if name not in codes and name not in created:
            return (f"{arg} changes a code the config does not have (its codes: {', '.join(codes)}); a new code "
                    f"needs its prior's class too, e.g. --model.codes.{name}.prior.class_path=aae_lightning.CategoricalPrior")
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input (a wrong config key or value, a missing or corrupt file or checkpoint, a NaN loss)
    ends the process with its one-line message on stderr and exit status 2, not a traceback. Lightning's
    MisconfigurationException is its bad input: trainer settings this machine or run cannot take."""
    try:
        yield
    except ArgumentError as err:
        print(f"error: {parse_error_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except (DataError, NonFiniteLossError, CheckpointError, ValueError, MisconfigurationException) as err:
        print(f"error: {root_cause(err)}", file=sys.stderr)
        sys.exit(2)


def cli_main(args=None, run: bool = True) -> AAECLI | None:
    """The CLI; with ``run=False`` it only builds model, data and trainer (for benchmarks).

    ``sweep FILE --count N`` runs a W&B sweep offline (see :mod:`aae_lightning.sweep`);
    ``figures --config C --ckpt_path CKPT`` draws a trained model's figures (:mod:`aae_lightning.figures`).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        from aae_lightning.sweep import main as sweep_main  # the sweep engine is needed only here

        sweep_main(argv[1:])
        return None
    if argv[:1] == ["figures"]:
        from aae_lightning.figures import main as figures_main

        figures_main(argv[1:])
        return None
    choose_wandb_mode()
    quiet_known_noise()
    try:
        with one_line_errors():
            return AAECLI(
                AdversarialAutoencoder,
                ImageDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=SaveConfigToRun,
                auto_configure_optimizers=False,
                # a parse error reaches one_line_errors rather than printing the whole usage
                parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                args=args,
                run=run,
            )
    finally:
        # close the run so a later cli_main in the same process starts its own, not reuses this one
        if run and wandb.run is not None:
            wandb.finish()
