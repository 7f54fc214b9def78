"""The pip pins and the conda environment must agree, and the pinned stack must import together."""

from __future__ import annotations

import importlib
import re

import yaml

from nbhelpers.settings.config import REPO_ROOT


def _pins(*files: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for name in files:
        for line in (REPO_ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                package, _, version = line.partition("==")
                assert version, f"{name}: {line!r} is not pinned with =="
                pins[package.lower()] = version
    return pins


def test_environment_yml_carries_the_same_pins():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert env["name"] == "cxr-workbook"
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = _pins_from_lines([p for p in pip_section if not p.startswith("-e")])
    assert conda_pins == _pins("requirements.txt", "requirements-grid.txt", "requirements-track.txt", "requirements-dev.txt")
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert re.fullmatch(r"python=3\.1[12]", python)


def _pins_from_lines(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        package, _, version = line.partition("==")
        assert version, f"environment.yml: {line!r} is not pinned with =="
        out[package.lower()] = version
    return out


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for package, pinned in _pins("requirements.txt", "requirements-grid.txt", "requirements-track.txt", "requirements-dev.txt").items():
        installed = version(package.split("[")[0]).split("+")[0]  # ray[tune]: ray's; torch: 2.14.1+cu130
        assert installed == pinned, f"{package}: installed {installed}, pinned {pinned}"


def test_the_pinned_stack_imports_together():
    # torchvision's compiled ops must match torch, and timm/grad-cam need torchvision.
    for module in ("torch", "torchvision", "timm", "cv2", "papermill", "seaborn", "sklearn",
                   "ptflops", "pytorch_grad_cam", "pydicom", "imagehash"):
        importlib.import_module(module)
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]
