"""The ``workbook`` program: every subcommand is reachable, shares the common options, and only
problems with the input or the setup become one line and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys

import pytest

import data_prep
import nbhelpers
from data_prep.errors import WorkbookError
from nbhelpers.models import complexity
from nbhelpers.tools import cli


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every runnable subcommand's parser by its words (``("bench", "loader")``)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return {path: parser}
    found = {}
    for name, sub in groups[0].choices.items():
        found.update(leaf_parsers(sub, (*path, name)))
    return found


LEAVES = leaf_parsers(cli.build_parser())


def test_help_lists_every_subcommand():
    done = subprocess.run([sys.executable, "-m", "nbhelpers", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = {m.group(1) for m in re.finditer(r"^    (\S+)", done.stdout, re.MULTILINE)}
    assert listed == {"run", "html", "curate", "download", "copies", "train", "grid", "explain", "audit", "shortcut", "findings",
                      "complexity", "bench", "lung-box", "gpu-check"} == set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("words", sorted(LEAVES), ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*words, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: workbook {' '.join(words)}")


def test_device_defaults_to_auto_wherever_it_is_an_option():
    with_device = {words for words, parser in LEAVES.items()
                   if any(a.dest == "device" for a in parser._actions)}
    assert {("train",), ("grid",), ("audit", "probe"), ("shortcut",), ("bench", "loader"), ("bench", "train")} <= with_device
    for words in with_device:
        device = next(a for a in LEAVES[words]._actions if a.dest == "device")
        assert device.default == "auto", words


def test_common_options_are_one_option_everywhere():
    for words, parser in LEAVES.items():
        options = {a.dest: a for a in parser._actions}
        if "data_dir" in options:
            assert options["data_dir"].option_strings == ["--data-dir"] and options["data_dir"].default is None, words
        if "out" in options:
            assert options["out"].metavar == "FOLDER", words
        if "set" in options:
            assert options["set"].nargs == "+" and isinstance(options["set"], argparse._ExtendAction), words
    assert not any("ablation_root" in {a.dest for a in p._actions} for p in LEAVES.values())


def test_an_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["nope"])
    assert done.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "nbhelpers", "nope"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2


def test_a_setup_error_is_one_line_and_status_2(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise WorkbookError("the input is wrong\nfix it like this")

    monkeypatch.setattr(complexity, "complexity_table", refuse)
    assert cli.main(["complexity", "--models", "squeezenet", "--no-latency", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: the input is wrong fix it like this\n"
    assert not (tmp_path / "complexity.csv").exists()


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), RuntimeError("a bug"),
                                 ValueError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(complexity, "complexity_table", broken)
    with pytest.raises(type(bug)):
        cli.main(["complexity", "--models", "squeezenet", "--no-latency", "--out", str(tmp_path)])


def test_dispatch_lets_a_setup_error_through(monkeypatch, tmp_path):
    monkeypatch.setattr(complexity, "complexity_table", lambda *a, **k: (_ for _ in ()).throw(WorkbookError("x")))
    with pytest.raises(WorkbookError):
        cli.dispatch(["complexity", "--models", "squeezenet", "--out", str(tmp_path)])


def _modules(package) -> list[str]:
    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
        if not info.name.endswith("__main__"):  # running it would start the program
            names.append(info.name)
    return names


def test_every_error_class_of_the_packages_is_a_workbook_error():
    errors = []
    for name in _modules(nbhelpers) + _modules(data_prep):
        module = importlib.import_module(name)
        errors += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, BaseException) and cls.__module__ == name]
    assert len(errors) >= 20  # the walk found the packages' errors
    not_ours = [f"{cls.__module__}.{cls.__qualname__}" for cls in errors if not issubclass(cls, WorkbookError)]
    assert not_ours == []


@pytest.mark.parametrize("words", [["--data-dir", "../shared/data/cxr-sources"], ["--data-dir=/home/me/cxr"]])
def test_a_recorded_command_names_the_data_folder_by_its_setting(words):
    line = cli.parse_args(["curate", *words, "--out", "some dir", "--per-class", "10"]).command_line
    assert line.startswith("workbook curate --data-dir")
    assert "$CXR_DATA_DIR" in line and "cxr-sources" not in line and "/home/me" not in line
    assert "'some dir'" in line  # the other words stay as typed, quoted for a shell


def test_a_recorded_command_without_a_data_folder_is_as_typed():
    assert cli.parse_args(["findings", "--check"]).command_line == "workbook findings --check"
