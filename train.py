"""vq4dit command line: ``python train.py fit --config configs/demo.yaml`` (LightningCLI).

Subcommands fit / validate / test / predict; ``--print_config`` after the subcommand. A user
mistake (bad model source, invalid bits, unwritable export folder, ...) prints one clear error
line and exits with status 2; set ``VQ4DIT_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings
from pathlib import Path

import yaml

from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

import callbacks  # noqa: F401  (short class paths in YAML: callbacks.CandidatePruning)
from callbacks import CalibrationReport, FinalAssignment, RunGuard, SampleWriter
from callbacks.settings import RANGE_ERROR
from vq4dit.lightning import CalibrationDataModule, CalibrationModule
from vq4dit.lightning.checkpoint_io import AtomicCheckpointIO
from vq4dit.lightning.resume import check_resumable, find_latest_checkpoint, logger_version_of


class VQ4DiTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always present: the final argmax + packed export at the end of fit, and the run guard
        # (resumable checkpoint on SIGTERM, no empty log folder after a failed start).
        parser.add_lightning_class_args(FinalAssignment, "final_assignment")
        parser.add_lightning_class_args(RunGuard, "run_guard")
        # Every fit reports its validation error at the end relative to its start (and warns if worse).
        parser.add_lightning_class_args(CalibrationReport, "calibration_report")
        # predict writes PNGs + a sample_ddp.py-style npz (inactive in the other subcommands).
        parser.add_lightning_class_args(SampleWriter, "sample_writer")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # SampleWriter writes the images; keeping them all would cost RAM
            parser.set_defaults(return_predictions=False)
        return parser

    def instantiate_trainer(self, **kwargs):
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])  # atomic saves, weights_only loads
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Replaces LightningCLI's, which silently swaps in the checkpoint's model settings: ``last``
        # means the newest checkpoint of this run's output folders, and a checkpoint is resumed only
        # with the settings it was calibrated with (before any heavy work).
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if subcommand == "fit" and (config.get("model") or {}).get("quantized"):
            raise ValueError("model.quantized is for test / predict / validate; resume a calibration with --ckpt_path")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" and subcommand == "fit":
            ckpt_path = self._resolve_last(config)
        if ckpt_path and Path(ckpt_path).is_file():
            check_resumable(ckpt_path, dict(config.get("model") or {}), dict(config.get("data") or {}))
            self._resume_path = ckpt_path
        elif ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            raise ValueError(f"ckpt_path {ckpt_path!r} does not exist")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if getattr(self, "_resume_path", None) and hasattr(self.model, "resume_checkpoint"):
            self.model.resume_checkpoint = self._resume_path  # its bit allocation is reused, not measured again

    def _resolve_last(self, config) -> str | None:
        trainer = config["trainer"]
        logger = trainer.get("logger")
        save_dir = logger.init_args.get("save_dir") if hasattr(logger, "init_args") else None
        folders = [f for f in (trainer.get("default_root_dir"), save_dir) if f] or [os.getcwd()]
        found = find_latest_checkpoint(folders)
        if found is None:
            print(f"--ckpt_path last: no checkpoint under {', '.join(map(str, folders))}; starting a new calibration",
                  file=sys.stderr)
            config["ckpt_path"] = None
            return None
        print(f"--ckpt_path last: resuming from {found}", file=sys.stderr)
        config["ckpt_path"] = str(found)
        version = logger_version_of(found)
        if version is not None and hasattr(logger, "init_args") and logger.init_args.get("version") is None:
            logger.init_args["version"] = version  # log on in the same folder, no new version_N
        return str(found)


def cli_main(args: ArgsType = None, run: bool = True) -> VQ4DiTCLI:
    """Parse ``args`` (default: ``sys.argv``) and run the subcommand; ``run=False``: build model,
    datamodule and trainer only (``args`` then has no subcommand), for scripts that add callbacks."""
    return VQ4DiTCLI(
        CalibrationModule,
        CalibrationDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def effective_config(*config_files: str | Path, subcommand: str = "fit") -> dict:
    """The full config of ``--config config_files...`` (later files override earlier ones) with every
    default filled in, as ``--print_config`` prints it: only parsed, no model is loaded or downloaded."""
    args = [subcommand, *(arg for path in config_files for arg in ("--config", str(path))), "--print_config"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")  # a script's own sys.argv
            cli_main(args)
    except SystemExit as stop:  # --print_config exits 0 after printing; a parse error exits 2
        if stop.code not in (0, None):
            raise ValueError(f"cannot parse {' '.join(args)} (the parser's message is above)") from None
    return yaml.safe_load(printed.getvalue())


# Harmless notices of Lightning that would only confuse users of this CLI.
for _message in (
    r".*`IterableDataset` has `__len__` defined.*",  # our datasets shard themselves per rank
    r".*Couldn't infer the batch indices.*",  # SampleWriter uses the sample indices in the batch
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
):
    warnings.filterwarnings("ignore", message=_message)


def one_line(message: str) -> str:
    """The line that names the mistake: jsonargparse wraps a callback's range error in a multi-line
    "Does not validate against any of the Union subtypes" report; keep only the range error."""
    found = re.search(rf"^\s*- (.*{RANGE_ERROR}.*)$", message, flags=re.MULTILINE)
    return found.group(1) if found else message


def main() -> None:
    try:
        cli_main()
    except SIGTERMException as stop:  # Lightning turns SIGTERM into a SystemExit with status 0
        saved = getattr(stop, "checkpoint", None)
        where = f"resumable checkpoint {saved}; resume with the same command plus --ckpt_path last" if saved \
            else "nothing calibrated yet; run the same command again"
        print(f"error: stopped by SIGTERM at step {getattr(stop, 'step', '?')}: {where}", file=sys.stderr)
        sys.exit(143)
    except ValueError as error:  # user mistakes are ValueErrors with a message naming the problem
        if os.environ.get("VQ4DIT_DEBUG"):
            raise
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
