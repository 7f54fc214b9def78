"""Notebook 01 opens in JupyterLab on the workbook's kernel, and its first cells run in a real browser.

The papermill tests check what the notebooks compute; this one checks what a reader of
``make lab`` sees.  It serves a copy of notebook 01 (Lab autosaves, and the source notebook stays
output-free) with the smoke profile and a temporary run folder set in a cell below the
parameters cell, the way papermill injects them.  Headless Chromium, driven by Playwright, opens
it, runs the parameters, that cell and the imports cell, and reads their outputs off the page.
The browser is Debian's Chromium (``apt-get install chromium``), not one Playwright downloads.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from nbhelpers.settings.config import KERNEL_NAME, REPO_ROOT
from nbhelpers.tools import run

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -r requirements-dev.txt")

pytestmark = pytest.mark.slow

NOTEBOOK = "01_data_curation.ipynb"
#: Upper bound for each wait (server up, kernel idle, outputs shown); the test takes well under this.
WAIT_S = 90
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Lab renders error outputs as stderr text; warnings (also stderr) are allowed, errors are not.
FAILURE = re.compile(r"Traceback|^\s*\w*(Error|Exception)\b", re.MULTILINE)


@pytest.fixture(scope="module")
def chromium() -> str:
    """The path of Debian's Chromium; without it the test skips, or fails under CI, whose
    ``.ci/run`` installs it."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        message = "Chromium not found: install it with `apt-get install -y chromium` to run the JupyterLab test"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Lab:
    """A running JupyterLab server (address, token, process, log) and the number of code cells of
    the served notebook to run: up to the one that calls ``start()``."""

    base: str
    token: str
    process: subprocess.Popen
    log: Path
    cells_to_run: int

    def url(self, path: str) -> str:
        return f"{self.base}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(self.url(f"api/{path}"), method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _served_copy(folder: Path, run_dir: Path) -> int:
    """Copy notebook 01 into ``folder`` with a cell after the parameters cell that sets the smoke
    profile and ``run_dir``, as papermill would; the source notebook is only read.  Returns how
    many code cells of the copy run up to and including the one that calls ``start()``."""
    nb = nbformat.read(REPO_ROOT / "notebooks" / NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f'profile = "smoke"\nrun_dir = {str(run_dir)!r}',
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
    folder.mkdir(parents=True)
    nbformat.write(nb, folder / NOTEBOOK)
    code = [c for c in nb.cells if c.cell_type == "code"]
    return 1 + next(i for i, c in enumerate(code) if "start(" in c.source)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quiet_settings(config_dir: Path) -> None:
    # No "official Jupyter news?" toast over the notebook, and no requests to the internet.
    folder = config_dir / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    folder.mkdir(parents=True)
    (folder / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@pytest.fixture
def lab(tmp_path: Path, data_dir: Path):
    """JupyterLab serving a copy of notebook 01 from ``tmp_path``, with ``CXR_DATA_DIR`` set to the
    real mirror and Jupyter's config and runtime folders in ``tmp_path``; shut down afterwards."""
    run.ensure_kernel()
    root = tmp_path / "notebooks"
    cells_to_run = _served_copy(root, tmp_path / "run")
    config_dir = tmp_path / "jupyter-config"
    _quiet_settings(config_dir)
    env = {**os.environ, "CXR_DATA_DIR": str(data_dir), "JUPYTER_CONFIG_DIR": str(config_dir),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"), "IPYTHONDIR": str(tmp_path / "ipython")}
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = tmp_path / "jupyterlab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, process, log, cells_to_run)
    try:
        _wait_until_up(server)
        yield server
    finally:
        _shut_down(server)


def _wait_until_up(server: Lab) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            server.api("status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer at {server.base} within {WAIT_S} s:\n{server.log_tail()}")


def _shut_down(server: Lab) -> None:
    # The shutdown request stops the kernels too; they run in sessions of their own, out of
    # reach of a signal to the server's process group.
    if server.process.poll() is None:
        try:
            server.api("shutdown", method="POST")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            print(f"JupyterLab did not take the shutdown request ({error}); stopping it by signal")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            server.process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, sig)
    server.process.wait(timeout=20)


def _wait_for_kernel(server: Lab, notebook: str = NOTEBOOK) -> str:
    """The name of the kernel of ``notebook``'s session, once that kernel is idle."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        sessions = [s for s in server.api("sessions") if s["path"].endswith(notebook)]
        if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
            return sessions[0]["kernel"]["name"]
        time.sleep(0.5)
    pytest.fail(f"no idle kernel for {notebook} within {WAIT_S} s:\n{server.log_tail()}")


def _keep_screenshot(page, tmp_path: Path) -> Path:
    path = tmp_path / "lab_01_data_curation.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("CXR_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(keep) / path.name)
    print(f"screenshot: {path}" + (f" (copied to {keep})" if keep else ""))
    return path


# True once the last cell to run shows an execution count, or an error output shows: Lab drops
# the cells queued after a failing one, so their counts would never come.
_DONE = """([n, stderr]) => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].slice(0, n);
  const last = cells.length === n ? cells[n - 1].querySelector('.jp-InputArea-prompt').textContent : '';
  const failed = [...document.querySelectorAll(stderr)].some(e => e.textContent.includes('Traceback'));
  return /^\\[\\d+\\]:$/.test(last.trim()) || failed;
}"""
STDERR = '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'


def test_notebook_01_runs_its_first_cells_in_jupyterlab(chromium: str, lab: Lab, tmp_path: Path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1500})
            page.set_default_timeout(WAIT_S * 1000)
            page.goto(lab.url(f"lab/tree/{NOTEBOOK}"))
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            cells.first.wait_for()
            assert _wait_for_kernel(lab) == KERNEL_NAME, f"{NOTEBOOK} did not start the {KERNEL_NAME} kernel"
            sync_api.expect(page.locator(".jp-Toolbar-kernelName")).to_have_text(f"Python ({KERNEL_NAME})",
                                                                                  timeout=WAIT_S * 1000)

            cells.first.locator(".jp-InputArea-editor").click()
            for _ in range(lab.cells_to_run):
                page.keyboard.press("Shift+Enter")
            page.wait_for_function(_DONE, arg=[lab.cells_to_run, STDERR])
            outputs = cells.nth(lab.cells_to_run - 1).locator(".jp-OutputArea")
            outputs.scroll_into_view_if_needed()
            shot = _keep_screenshot(page, tmp_path)

            failures = [text for text in page.locator(STDERR).all_inner_texts() if FAILURE.search(text)]
            assert not failures, f"error output in the notebook (see {shot}):\n" + "\n".join(failures)
            prompts = [cells.nth(i).locator(".jp-InputArea-prompt").inner_text().strip()
                       for i in range(lab.cells_to_run)]
            expected = [f"[{i + 1}]:" for i in range(lab.cells_to_run)]
            assert prompts == expected, f"execution counts {prompts}, expected {expected} (see {shot})"
            # start() prints the profile and shows the resolved settings as a table, and creates
            # the run folder the injected cell names; without the data (CXR_DATA_DIR) it raises.
            sync_api.expect(outputs).to_contain_text("profile 'smoke':", timeout=WAIT_S * 1000)
            sync_api.expect(outputs.locator("table")).to_contain_text("data_dir", timeout=WAIT_S * 1000)
            assert (tmp_path / "run").is_dir(), "start() did not create the injected run folder"
        finally:
            browser.close()


def test_a_workbook_error_shows_its_one_line_in_jupyterlab(chromium: str, lab: Lab, tmp_path: Path):
    """A student's mistake (a later notebook before notebook 01) reads as its one line in the cell's
    output; the installed IPython drops what a custom handler returns, so this once showed nothing."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": KERNEL_NAME, "display_name": f"Python ({KERNEL_NAME})",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(f"from nbhelpers.tools.notebook import start\n"
                                          f"s = start('smoke', run_dir={str(tmp_path / 'empty-run')!r})"),
                nbformat.v4.new_code_cell("s.manifest_path")]
    nbformat.write(nb, tmp_path / "notebooks" / "mistake.ipynb")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(WAIT_S * 1000)
            page.goto(lab.url("lab/tree/mistake.ipynb"))
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            cells.first.wait_for()
            assert _wait_for_kernel(lab, "mistake.ipynb") == KERNEL_NAME
            cells.first.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            page.keyboard.press("Shift+Enter")
            error = cells.nth(1).locator(STDERR)
            sync_api.expect(error).to_contain_text("run notebook 01 first", timeout=WAIT_S * 1000)
            text = error.inner_text()
            assert text.strip().startswith("MissingStepError: no curated set") and "Traceback" not in text, text
            assert len(text.strip().splitlines()) == 1, text
        finally:
            browser.close()
