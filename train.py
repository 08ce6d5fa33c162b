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

import torch
import yaml

from pytorch_lightning.cli import ArgsType, LightningCLI

import callbacks  # noqa: F401  (short class paths in YAML: callbacks.CandidatePruning)
from callbacks import FinalAssignment, SampleWriter
from callbacks.settings import RANGE_ERROR
from vq4dit.lightning import CalibrationDataModule, CalibrationModule


# Model settings that may differ between a checkpoint and the run resuming or evaluating it.
RESUMABLE_CHANGES = {"export_dir", "quantized", "eval_model", "vae", "metrics_features", "real_images", "spread_blocks"}


class VQ4DiTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always present: the final argmax + packed export at the end of fit.
        parser.add_lightning_class_args(FinalAssignment, "final_assignment")
        # predict writes PNGs + a sample_ddp.py-style npz (inactive in the other subcommands).
        parser.add_lightning_class_args(SampleWriter, "sample_writer")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # SampleWriter writes the images; keeping them all would cost RAM
            parser.set_defaults(return_predictions=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        # LightningCLI silently replaces the model settings by the checkpoint's: refuse instead
        # when the user asked for different ones, so a resume never runs another configuration.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            except Exception as error:  # unreadable file: say so instead of a traceback
                raise ValueError(f"cannot read checkpoint {ckpt_path}: {error}") from error
            asked = self.config[subcommand].get("model") or {}
            changed = sorted(
                key for key, value in saved.items()
                if key in asked and key not in RESUMABLE_CHANGES and asked[key] != value
            )
            if changed:
                details = ", ".join(f"{k}: checkpoint {saved[k]!r}, this run {asked[k]!r}" for k in changed)
                raise ValueError(
                    f"cannot resume from {ckpt_path}: it was calibrated with another configuration ({details})"
                )
        elif ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            raise ValueError(f"ckpt_path {ckpt_path!r} does not exist")
        super()._parse_ckpt_path()


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
    except ValueError as error:  # user mistakes are ValueErrors with a message naming the problem
        if os.environ.get("VQ4DIT_DEBUG"):
            raise
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
