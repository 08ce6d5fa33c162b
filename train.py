"""vq4dit command line: ``python train.py fit --config configs/demo.yaml`` (LightningCLI).

Subcommands fit / validate / test / predict; ``--print_config`` after the subcommand. A user
mistake (bad model source, invalid bits, unwritable export folder, ...) prints one clear error
line and exits with status 2; set ``VQ4DIT_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import yaml

from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.exceptions import SIGTERMException

import callbacks  # noqa: F401  (short class paths in YAML: callbacks.CandidatePruning)
from callbacks import BlockWindows, CalibrationReport, FinalAssignment, RunGuard, SampleWriter
from callbacks.settings import RANGE_ERROR
from vq4dit.lightning import CalibrationDataModule, CalibrationModule
from vq4dit.lightning.checkpoint_io import AtomicCheckpointIO
from vq4dit.lightning.resume import check_resumable, find_latest_checkpoint, logger_version_of
from vq4dit.lightning.settings import LEGACY_NAMES, nest_legacy, resolved_record


class VQ4DiTParser(LightningArgumentParser):
    """Prints a bad value of one flag (``--model.lr_codebook nan``) as one ``error:`` line, not the
    usage of every flag; other parse errors as jsonargparse does."""

    def error(self, message: str, ex: Exception | None = None):
        found = re.search(r'Parser key "([^"]+)":\s*(.+)', message, flags=re.DOTALL)
        if found is None or not self.exit_on_error or os.environ.get("VQ4DIT_DEBUG"):
            return super().error(message, ex)
        key, detail = found.group(1), " ".join(found.group(2).split())
        value = re.search(r"Got value: (\S+)$", detail)
        if value and value.group(1).lower().lstrip("+-") in ("nan", "inf", "infinity"):
            detail = f"{value.group(1)} is not a finite number"
        print(f"error: --{key}: {detail[:300]} (--help lists the options)", file=sys.stderr)
        sys.exit(2)


class VQ4DiTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always present: the final argmax + packed export at the end of fit, and the run guard
        # (resumable checkpoint on SIGTERM, no empty log folder after a failed start).
        # Every fit reports its validation error at the end relative to its start, and keeps the start
        # when it ended worse: before FinalAssignment, whose on_fit_end exports.
        parser.add_lightning_class_args(CalibrationReport, "calibration_report")
        parser.add_lightning_class_args(FinalAssignment, "final_assignment")
        parser.add_lightning_class_args(RunGuard, "run_guard")
        # Block-by-block calibration (--model.calibration.window_blocks) moves on by this rule; inactive without it.
        parser.add_lightning_class_args(BlockWindows, "block_windows")
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

    def before_fit(self) -> None:
        self.model.check_processes(self.trainer.world_size)  # before the trajectories: one error line

    def _parse_ckpt_path(self) -> None:
        # Replaces LightningCLI's, which silently swaps in the checkpoint's model settings: ``last``
        # means the newest checkpoint of this run's output folders, and a checkpoint is resumed only
        # with the settings it was calibrated with (before any heavy work).
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        model = config.get("model")
        model = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
        if subcommand == "fit" and (model.get("evaluation") or {}).get("quantized"):
            raise ValueError("model.quantized is for test / predict / validate (model.evaluation.quantized); "
                             "resume a calibration with --ckpt_path")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" and subcommand == "fit":
            ckpt_path = self._resolve_last(config)
        if ckpt_path and Path(ckpt_path).is_file():
            check_resumable(ckpt_path, model, dict(config.get("data") or {}),
                            resolve=functools.partial(resolved_record, CalibrationModule.__init__))
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


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _translated_config(source: str) -> str:
    """A ``--config`` file (or YAML string) with its former flat ``model:`` names moved to their
    groups: the same path when it has none, else the translated YAML text (one notice per name)."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else source
        content = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return source  # the parser reports it
    if not isinstance(content, dict):
        return source
    sections = [content] + [content[name] for name in SUBCOMMANDS if isinstance(content.get(name), dict)]
    moved_any = False
    for section in sections:
        if isinstance(section.get("model"), dict):
            section["model"], moved = nest_legacy(section["model"])
            for old, new in moved:
                print(f"note: model.{old} in {source if path.is_file() else '--config'} is now model.{new}", file=sys.stderr)
            moved_any = moved_any or bool(moved)
    return yaml.safe_dump(content, sort_keys=False) if moved_any else source


def translate_legacy(args: list[str]) -> list[str]:
    """``args`` with the former flat ``--model.X`` flags (``--model.bits 3``) renamed to their place
    in the nested settings (``--model.vq.bits 3``), in flags and in ``--config`` files, with one
    ``note:`` line per renamed flag (``vq4dit.lightning.settings.LEGACY_NAMES``)."""
    translated, after_config = [], False
    for arg in args:
        if after_config:
            translated.append(_translated_config(arg))
            after_config = False
            continue
        if arg == "--config":
            after_config = True
        elif arg.startswith("--config="):
            arg = "--config=" + _translated_config(arg[len("--config="):])
        elif arg.startswith("--model."):
            name, sep, value = arg[len("--model."):].partition("=")
            if name in LEGACY_NAMES:
                print(f"note: --model.{name} is now --model.{LEGACY_NAMES[name]}", file=sys.stderr)
                arg = f"--model.{LEGACY_NAMES[name]}{sep}{value}"
        translated.append(arg)
    return translated


PROMPT_SOURCES = ("--data.prompt_embeds", "--data.prompts")


def prompts_from_command_line(args: list[str]) -> list[str]:
    """``args`` where a prompt source given as a flag replaces the other one a ``--config`` names:
    ``--data.prompt_embeds F`` appends ``--data.prompts=null`` and ``--data.prompts F`` appends
    ``--data.prompt_embeds=null`` (both as flags: the data module refuses both)."""
    given = [source for source in PROMPT_SOURCES if any(a == source or a.startswith(source + "=") for a in args)]
    if len(given) != 1:
        return args
    other = next(source for source in PROMPT_SOURCES if source not in given)
    return [*args, f"{other}=null"]


def cli_main(args: ArgsType = None, run: bool = True) -> VQ4DiTCLI:
    """Parse ``args`` (default: ``sys.argv``) and run the subcommand; ``run=False``: build model,
    datamodule and trainer only (``args`` then has no subcommand), for scripts that add callbacks.
    The former flat ``--model.*`` names are translated (:func:`translate_legacy`); a prompt source
    given as a flag replaces the config's (:func:`prompts_from_command_line`)."""
    if args is None:  # sys.argv: passed on only when a former flag was renamed or a prompt source given
        translated = prompts_from_command_line(translate_legacy(sys.argv[1:]))
        args = None if translated == sys.argv[1:] else translated
    elif isinstance(args, (list, tuple)):
        args = prompts_from_command_line(translate_legacy(list(args)))
    return VQ4DiTCLI(
        CalibrationModule,
        CalibrationDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_class=VQ4DiTParser,
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
    r".*args parameter is intended.*",  # cli_main passes sys.argv with the former flag names translated
):
    warnings.filterwarnings("ignore", message=_message)


def one_line(message: str) -> str:
    """The line that names the mistake: jsonargparse wraps a callback's range error in a multi-line
    "Does not validate against any of the Union subtypes" report; keep only the range error."""
    found = re.search(rf"^\s*- (.*{RANGE_ERROR}.*)$", message, flags=re.MULTILINE)
    return found.group(1) if found else message


# Outermost function of each phase before the fit loop (where a SIGTERM there stopped the run).
PHASES = {
    "load_dit": "loading the model", "generate_items": "generating the teacher trajectories",
    "input_second_moments": "measuring the activation statistics",
    "gather_statistics": "measuring the activation statistics",
    "allocate_bits": "measuring the bit-allocation sensitivities",
    "probe_allocation": "measuring the bit-allocation sensitivities",
    "build_student": "the k-means start", "build_layers": "the k-means start",
}


def _stop_before_the_fit(signum: int, frame) -> None:
    """SIGTERM before Lightning's own handler is in place (loading, trajectories, statistics, bit
    allocation, k-means): stop now with a ``SIGTERMException`` naming the phase; once the fit has
    installed its handler (which calls this one too), Lightning stops at the next step itself."""
    if signal.getsignal(signal.SIGTERM) is not _stop_before_the_fit:
        return
    phase = None
    while frame is not None:
        phase = PHASES.get(frame.f_code.co_name, phase)  # the outermost one wins
        frame = frame.f_back
    stop = SIGTERMException()
    stop.phase = phase or "setting up the calibration"
    raise stop


def close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line), so an ``error:`` line printed after a fault
    in the middle of a bar (encoding, trajectories, statistics, k-means) starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _stop_before_the_fit)
    try:
        cli_main()
    except SIGTERMException as stop:  # Lightning turns SIGTERM into a SystemExit with status 0
        saved = getattr(stop, "checkpoint", None)
        where = f"resumable checkpoint {saved}; resume with the same command plus --ckpt_path last" if saved \
            else "nothing calibrated yet, nothing written; run the same command again"
        phase = f" while {stop.phase}" if getattr(stop, "phase", None) else ""
        close_progress_bars()
        print(f"error: stopped by SIGTERM at step {getattr(stop, 'step', 0)}{phase}: {where}", file=sys.stderr)
        sys.exit(143)
    except (ValueError, MisconfigurationException) as error:  # user mistakes, with a message naming the problem
        if os.environ.get("VQ4DIT_DEBUG"):
            raise
        close_progress_bars()
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # an environment fault outside the atomic writers (they raise WriteError)
        if os.environ.get("VQ4DIT_DEBUG"):
            raise
        where = f": {error.filename}" if error.filename else ""
        close_progress_bars()
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
