"""The documentation works as written: every Python block of README.md and docs/*.md runs, every
``python -m jaxcifar.*`` command of its bash blocks parses, every relative link resolves, and
docs/cli.md is what tools/gen_cli_docs.py generates from the code.

Python blocks run in a temporary folder holding ``data/cifar10-jpeg`` (the conftest's subset of the
shared images) and ``runs/resnet18`` (a copy of the conftest's finished one-epoch run), only when the
block names them. The one change made to a block: every ``Config(...)`` call gets the tiny sizes (and
the LR that suits them) of ``TINY`` (a CPU test cannot train width 64 for 20 epochs). A block
fenced as ```` ```python no-run ```` is only compiled. Blocks that train or make a report
(``fit(``, ``run(``, ``make_report(``) take 20-40 s of CPU each, so they run in the slow tier.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import torch_support

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# The conftest's real_run: the same shapes and LR compile to the same programs, which the session's
# persistent compilation cache then serves to every block that trains.
TINY = dict(width=8, epochs=1, train_subset=400, test_subset=200, batch_size=50, lr=0.05)
NO_RUN = "no-run"
COMMANDS = ("train", "lr_find", "report", "bench", "race")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its file, first line (1-based), language, fence options and text."""

    path: Path
    line: int
    language: str
    options: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Returns the fenced blocks of a Markdown file, in order."""
    text = path.read_text()
    return [
        Block(path, text.count("\n", 0, m.start()) + 2, m.group(1), m.group(2).strip(), m.group(3))
        for m in FENCE.finditer(text)
    ]


BLOCKS = [block for path in DOCS for block in code_blocks(path)]
PYTHON = [b for b in BLOCKS if b.language == "python"]
TRAINS = re.compile(r"\b(fit|run|make_report)\(")  # a block that trains or reports is an end-to-end run: slow tier
USES_TORCH = re.compile(r"^\s*import torch|torch_resnet", re.MULTILINE)
BASH = [b for b in BLOCKS if b.language == "bash"]


class _TinyConfigs(ast.NodeTransformer):
    """Sets the keywords of ``TINY`` in every ``Config(...)`` / ``jaxcifar.Config(...)`` call."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name == "Config":
            node.keywords = [k for k in node.keywords if k.arg not in TINY]
            node.keywords += [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in TINY.items()]
        return node


def tiny_program(block: Block):
    """Returns the block compiled with ``TINY`` sizes in its Config calls (a SyntaxError names the block)."""
    tree = ast.fix_missing_locations(_TinyConfigs().visit(ast.parse(block.text, block.name)))
    return compile(tree, block.name, "exec")


def test_the_blocks_are_found():
    assert len(PYTHON) >= 4 and len(BASH) >= 5, [b.name for b in BLOCKS]
    assert any(b.path.name == "README.md" for b in PYTHON)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b,
            marks=[
                mark
                for mark, needed in ((pytest.mark.slow, TRAINS), (pytest.mark.torch, USES_TORCH))
                if needed.search(b.text)
            ],
        )
        for b in PYTHON
    ],
    ids=lambda b: b.name,
)
def test_python_block_runs_as_written(block: Block, request, tmp_path, monkeypatch):
    program = tiny_program(block)
    if block.options == NO_RUN:
        return
    assert block.options == "", f"{block.name}: unknown fence options {block.options!r} (only {NO_RUN})"
    if USES_TORCH.search(block.text):
        torch_support.require("torch")
    if "data/cifar10-jpeg" in block.text:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "cifar10-jpeg").symlink_to(request.getfixturevalue("shared_data_dir"))
    if "runs/resnet18" in block.text:
        config, _ = request.getfixturevalue("real_run")
        shutil.copytree(config.workdir, tmp_path / "runs" / "resnet18", ignore=shutil.ignore_patterns(".lock"))
    monkeypatch.chdir(tmp_path)
    exec(program, {"__name__": f"doc_block_{block.line}"})


def test_tiny_configs_reach_every_config_call():
    block = Block(REPO / "README.md", 1, "python", "", "import jaxcifar\nc = jaxcifar.Config(width=64, epochs=20)\n")
    namespace: dict = {}
    exec(tiny_program(block), namespace)
    assert (namespace["c"].width, namespace["c"].epochs, namespace["c"].batch_size) == (8, 1, 50)


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Returns ``(command, argv)`` of every ``python -m jaxcifar.COMMAND ...`` in a bash block (also inside
    quoted strings such as ``ssh --command "..."``); ``...`` placeholders are dropped."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            if " python -m jaxcifar." in f" {token}":
                found += commands(token)
            if token == "python" and tokens[i + 1 : i + 2] == ["-m"] and i + 2 < len(tokens):
                module = tokens[i + 2]
                if module.startswith("jaxcifar."):
                    argv = []
                    for arg in tokens[i + 3 :]:
                        if arg in ("&", "&&", ";", "|", "||"):
                            break
                        if arg != "...":
                            argv.append(arg)
                    found.append((module.removeprefix("jaxcifar."), argv))
    return found


@pytest.mark.parametrize("block", BASH, ids=lambda b: b.name)
def test_bash_commands_use_real_flags(block: Block, monkeypatch, capsys):
    from jaxcifar import cli

    monkeypatch.chdir(REPO)  # --config paths are relative to the repository
    for command, argv in commands(block.text):
        assert command in COMMANDS, f"{block.name}: python -m jaxcifar.{command} is not a command"
        parser = importlib.import_module(f"jaxcifar.{command}").build_parser()
        try:
            if command in ("train", "lr_find", "bench"):
                cli.parse_config(parser, argv)  # the flags and the Config they build
            else:
                parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{block.name}: python -m jaxcifar.{command} {shlex.join(argv)}: {capsys.readouterr().err}")


def test_commands_finds_the_commands_of_a_bash_block():
    text = (
        "X=1 python -m jaxcifar.train --epochs 2 \\\n  --width 8 &  # comment\n"
        'ssh h --command "cd x && python -m jaxcifar.report --n 3"\npython -m jaxcifar.bench ...\n'
    )
    assert commands(text) == [("train", ["--epochs", "2", "--width", "8"]), ("report", ["--n", "3"]), ("bench", [])]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path):
    targets = [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(REPO)}: links to missing files: {missing}"


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "tar -xzf ../shared/data/cifar10-jpeg.tar.gz" in readme


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_issue_numbers_in_user_facing_text(path: Path):
    assert not re.findall(r"\bissues?[ -]\d+", path.read_text(), re.IGNORECASE)


def test_cli_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "tools" / "gen_cli_docs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert (REPO / "docs" / "cli.md").read_text() == generator.render(), (
        "docs/cli.md is out of date: run python tools/gen_cli_docs.py"
    )


def test_the_workdir_layout_is_what_docs_workdir_md_documents(tmp_path):
    """Every path ``layout.RunDir`` names (the report's pictures included) is a row of docs/workdir.md's table,
    and every row is a path it names."""
    from jaxcifar.layout import RunDir
    from jaxcifar.report import FIGURES

    documented = set()
    for line in (REPO / "docs" / "workdir.md").read_text().splitlines():
        if line.startswith("| `"):
            documented |= {name.split("/")[0] for name in re.findall(r"`([^`]+)`", line.split("|")[1])}
    rundir = RunDir(tmp_path)
    paths = [getattr(rundir, name) for name, value in vars(RunDir).items() if isinstance(value, property)]
    paths += [rundir.figure(name) for name in (*FIGURES, "cam")]
    assert {path.relative_to(tmp_path).as_posix() for path in paths} == documented
