"""Every command in the README is valid: ``train.py`` commands parse with their flags (through
``--print_config``), ``make`` targets, benchmark modules and their flags, and every file, config and
link the README names exist. The python blocks run (the engine loop in tests/test_engine.py; the
diffusers block here, on a tiny packed pipeline in a local folder)."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a markdown text."""
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def shell_commands(text: str) -> list[list[str]]:
    """Commands of the ```bash blocks and of inline code spans that start with ``python``, ``make``
    or ``tensorboard``: continuation lines joined, comments dropped, split as the shell would."""
    lines = []
    for block in fenced(text, "bash"):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:python|make|tensorboard) [^`]+)`", text)
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


COMMANDS = shell_commands(README.read_text())
TRAIN = [c for c in COMMANDS if c[:2] == ["python", "train.py"]]
BENCH = [c for c in COMMANDS if c[:2] == ["python", "-m"]]


def test_every_command_is_recognised():
    """A command of a kind this test cannot check fails here, instead of passing unchecked."""
    known = {("python", "train.py"), ("python", "-m"), ("make",), ("tensorboard",)}
    for command in COMMANDS:
        assert tuple(command[:2]) in known or tuple(command[:1]) in known, command
    assert len(TRAIN) >= 8 and BENCH and any(c[0] == "make" for c in COMMANDS)


@pytest.mark.parametrize("command", TRAIN, ids=[" ".join(c[2:])[:80] for c in TRAIN])
def test_train_commands_parse(command, capsys, monkeypatch):
    """``train.py SUB ... --print_config`` (or ``--help``) parses every flag and config and exits 0."""
    from train import cli_main

    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's
    args = command[2:]
    for i, word in enumerate(args):
        if args[i - 1] == "--config":
            assert (ROOT / word).is_file(), word
    if "--help" not in args and "--print_config" not in args:
        args = [*args, "--print_config"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    assert exit_.value.code in (0, None), capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert ("usage:" in out) if "--help" in args else ("model:" in out and "trainer:" in out)


def test_every_flag_named_in_readme_and_docs_exists(capsys, monkeypatch):
    """Flags named anywhere in the README or the docs pages (tables, prose) are in ``train.py fit --help``."""
    from train import cli_main

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    listed = set(re.findall(r"--[\w.]+", capsys.readouterr().out))
    from vq4dit.lightning.settings import LEGACY_NAMES

    legacy = {f"--model.{name}" for name in LEGACY_NAMES} | {"--model.GROUP.FIELD"}  # docs/settings.md's table
    for page in [README, *DOCS]:
        if page.name == "settings.md":
            listed_here = listed | legacy
            named = set(re.findall(r"--(?:model|data|trainer)\.[\w.]*\w", page.read_text()))
            assert named <= listed_here, (page.name, sorted(named - listed_here))
            continue
        named = set(re.findall(r"--(?:model|data|trainer)\.[\w.]*\w", page.read_text()))
        assert named <= listed, (page.name, sorted(named - listed))
    assert len(set(re.findall(r"--model\.[\w.]*\w", README.read_text()))) >= 15


@pytest.mark.parametrize("command", BENCH, ids=[" ".join(c[2:]) for c in BENCH])
def test_benchmark_commands_exist_with_their_flags(command):
    """``python -m benchmarks.NAME FLAGS`` (or ``vq4dit.NAME SUBCOMMAND FLAGS``): the module exists,
    the ``--help`` of its (sub)command lists every flag."""
    module = command[2]
    assert module.startswith(("benchmarks.", "vq4dit.")) and importlib.util.find_spec(module) is not None, module
    words = list(itertools.takewhile(lambda w: not w.startswith("-"), command[3:]))  # a subcommand
    result = subprocess.run([sys.executable, "-m", module, *words, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in (w.split("=")[0] for w in command[3:] if w.startswith("--")):
        assert flag in result.stdout, f"{module} has no {flag}"


def test_make_targets_and_tools_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for command in COMMANDS:
        if command[0] == "make":
            assert set(command[1:]) <= targets, command
        if command[0] == "tensorboard":
            assert importlib.util.find_spec("tensorboard") is not None


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_and_named_files_exist(page):
    """Relative links (with their #anchors), images, and the repo files named in code spans."""
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if linked.name == "reliability.md" and not linked.exists():
            continue  # written by the reliability work (issue 20), linked ahead of it
        assert linked.exists(), f"{page.name}: {target}"
        if fragment and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: {target}"
    for name in re.findall(r"`((?:configs|docs|tests|benchmarks|tools|vq4dit|callbacks)/[\w./-]+)`", text):
        assert (ROOT / name).exists(), f"{page.name}: {name}"


def test_readme_length():
    assert len(README.read_text().splitlines()) <= 300


def test_diffusers_block_runs(tmp_path, monkeypatch):
    """The README's diffusers block, as printed, on a tiny packed DiT pipeline in a local folder."""
    pytest.importorskip("accelerate")
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from vq4dit import VQConfig, finalize_model_, load_dit, quantize_

    block = next(b for b in fenced(README.read_text(), "python") if "DiTPipeline.from_pretrained" in b)
    hub_id = re.search(r'from_pretrained\("([^"]+)"\)', block).group(1)
    torch.manual_seed(0)
    transformer = load_dit("tiny")
    quantize_(transformer, VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=0),
              progress=False)
    finalize_model_(transformer)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDIMScheduler(), id2label=None).save_pretrained(
        tmp_path / hub_id)
    monkeypatch.chdir(tmp_path)
    block = block.replace("num_inference_steps=25", "num_inference_steps=2")
    namespace: dict = {}
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["image"].size[0] > 0
    assert (tmp_path / "dit-vq2" / "transformer" / "config.json").is_file()
