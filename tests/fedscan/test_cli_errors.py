"""The `fedscan` command line as a person meets it: help, version, log level, exit codes.

Every option explains itself, no developer notes leak into --help, the exit codes form one
table without clashes (README, systemd unit and error trees agree), and every command that
needs the `train` extra ends, on an install without torch, with one line naming the extra
(run as real subprocesses with an import blocker for torch & co. on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedscan.cli import build_parser, main
from fedscan.errors import EXIT_CODES, MissingExtraError

REPO = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "timm", "onnx", "onnxscript", "matplotlib", "dp_accounting"}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("fedscan",)
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, (*path, name))
    return found


def test_every_option_of_every_command_has_help_text() -> None:
    """Walk the whole argparse tree: each option, positional and subcommand has help."""
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                named = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{' '.join(path)} {n}" for n in action.choices if n not in named]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert not missing, missing


DEVELOPER_NOTES = re.compile(
    r"imports? stay light|is imported when|not built yet|TODO|FIXME|XXX|CONTRACTS\.md|\bH\d[ab]?\b"
)


def test_help_carries_no_developer_notes() -> None:
    """What `--help` prints is for the person running the command, not for the code's authors."""
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert not DEVELOPER_NOTES.search(text), (path, DEVELOPER_NOTES.search(text))


def test_version_and_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the package version; an unknown `--log-level` is refused (exit 2)."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert re.fullmatch(r"fedscan \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    with pytest.raises(SystemExit) as done:
        main(["--log-level", "LOUD", "node", "--help"])
    assert done.value.code == 2
    assert "DEBUG, INFO, WARNING, ERROR" in capsys.readouterr().err
    assert build_parser().parse_args(["--log-level", "warning", "node"]).log_level == "WARNING"


def test_exit_codes_form_one_table_everywhere() -> None:
    """Each error class has its own documented code (no number means two things), README lists
    the same table, and systemd does not restart on the codes that need a person."""
    expected = {
        ("edge_node.errors", "ConfigError"): 2,
        ("coordinator.errors", "ConfigError"): 2,
        ("coordinator.errors", "UnknownStrategyError"): 2,
        ("export.errors", "UnknownArchError"): 2,
        ("edge_node.errors", "ModelError"): 3,
        ("edge_node.errors", "StoreError"): 4,
        ("coordinator.errors", "StateError"): 4,
        ("edge_node.errors", "LabelError"): 5,
        ("edge_node.errors", "TrainingError"): 6,
        ("fl_protocol.errors", "TransportError"): 7,
        ("fedscan.errors", "MissingExtraError"): 8,
        ("fedscan.errors", "DatasetError"): 10,
        ("fedscan.errors", "ProvisionError"): 11,
        ("export.errors", "WeightsError"): 12,
        ("export.errors", "ParityError"): 13,
        ("fedscan.errors", "BenchError"): 14,
        ("fedscan.demo.errors", "DemoError"): 15,
        ("fedscan.experiment.errors", "ExperimentError"): 16,
        ("fedscan.pretrain.errors", "PretrainError"): 17,
    }
    for (module, name), code in expected.items():
        cls = getattr(importlib.import_module(module), name)
        assert cls.exit_code == code, (module, name, cls.exit_code)
        assert code in EXIT_CODES
        doc = importlib.import_module(module).__doc__ or ""
        assert re.search(rf"{name}\s+exit {code}\b", doc), f"{module} docstring: {name}"
    from edge_node.errors import SOME_INPUTS_FAILED

    assert SOME_INPUTS_FAILED == 9 and "some inputs" in EXIT_CODES[9]
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert documented == set(EXIT_CODES)
    unit = (REPO / "deploy" / "fedscan-node.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("RestartPreventExitStatus=")]
    assert line.split("=", 1)[1].split() == ["2", "3", "8"]


TRAIN_COMMANDS = [
    ["export", "--arch", "cnn2d", "--out", "m.onnx"],
    ["coordinator", "run", "--config", "coordinator.toml"],
    ["demo", "--out", "demo-out"],
    ["node", "train", "--config", "node.toml"],
    ["experiment", "--dataset", "data", "--json", "out.json"],
    ["pretrain", "--inbox", "x", "--out", "y.safetensors"],
]


@pytest.mark.parametrize("argv", TRAIN_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_commands_that_need_the_train_extra_say_so_in_one_line(
    argv: list[str], tmp_path: Path
) -> None:
    """On a predict-only install (torch & co. cannot be imported) each training command ends
    with one line naming the `train` extra and exits 8: no traceback, nothing started."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{REPO}", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "fedscan.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == MissingExtraError.exit_code == 8, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("fedscan: error: ") and "'train' extra" in lines[0]
    assert "exit 8" in lines[0]
    assert not (tmp_path / "demo-out").exists()


def test_readme_cli_block_is_the_parser() -> None:
    """README's CLI block lists exactly the commands and help lines the parser has (after
    adding a command, paste ``fedscan.cli.command_lines()`` under the block's first line)."""
    from fedscan.cli import command_lines

    readme = (REPO / "README.md").read_text()
    block = readme.split("## The CLI\n\n```\n", 1)[1].split("```\n", 1)[0]
    header = "fedscan [--log-level LEVEL] [--version] COMMAND ...\n"
    assert block == header + "\n".join(command_lines()) + "\n"
