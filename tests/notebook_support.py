"""Test helpers for sitq's notebook layer: isolated Jupyter state, an nbclient
runner, an isolated JupyterLab server and Playwright pages on Debian's Chromium.

Nothing here is a fixture; test modules wrap these helpers in fixtures of the
scope they need (one Lab server per browser module, a fresh kernel per notebook).
"""
from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"  # Debian's package `chromium`
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-dev-shm-usage",
]
REPO = Path(__file__).resolve().parent.parent

# Lab's toolbar indicator reads "idle" before the notebook has a session, and a
# Run All issued then does nothing: wait on the session's kernel object instead
# (window.jupyterapp exists only with --LabApp.expose_app_in_browser).
KERNEL_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && w.sessionContext.isReady && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


def isolate_jupyter_env() -> str:
    """Point IPython's and Jupyter's per-user dirs at a fresh temp dir, so tests
    neither read the developer's config nor write history under $HOME.
    Returns the temp dir; set before IPython is imported."""
    state = tempfile.mkdtemp(prefix="sitq-test-jupyter-")
    for var, sub in (("IPYTHONDIR", "ipython"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces")):
        os.environ[var] = os.path.join(state, sub)
    os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # quiets debugpy in kernels
    return state


def visible_text(markup: str) -> str:
    """The text a reader sees in HTML: rich splits words into many <span>s."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def wait_until(predicate, timeout=30.0, interval=0.01):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


# --- nbclient ---------------------------------------------------------------

def new_notebook(*sources: str):
    from nbformat.v4 import new_code_cell
    from nbformat.v4 import new_notebook as _new
    nb = _new(cells=[new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def execute(nb, cwd, timeout=60, allow_errors=False, kernel_name="python3"):
    """Execute `nb` in place in a fresh kernel (python3: this interpreter) whose working
    dir is `cwd`; widget state is stored in nb.metadata. Returns nb."""
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, allow_errors=allow_errors,
                   store_widget_state=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def run_cells(*sources: str, cwd, timeout=60, allow_errors=False):
    """Run code cells in one fresh kernel; return the executed cells."""
    return execute(new_notebook(*sources), cwd, timeout, allow_errors).cells


def widget_states(nb) -> dict:
    """model_id -> {"model_name":..., "state": {...}} as recorded by nbclient."""
    ws = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return ws.get("state", {})


def outputs_text(cell) -> str:
    """All text a cell showed: streams, text/plain and visible text of HTML."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(str(out.data.get("text/plain", "")))
            parts.append(visible_text(str(out.data.get("text/html", ""))))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "\n".join(parts)


# --- kernels on other Pythons -----------------------------------------------------

PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # what pyproject.toml promises (requires-python >= 3.10)
KERNEL_VENVS = REPO / ".venv-kernels"


def find_python(version):
    """An interpreter of ``version`` ("3.12") that runs: under pyenv, or on PATH as python3.12;
    None if there is none. (A pyenv shim on PATH for a version it does not have fails to run.)"""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(p) for p in sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True)]
    candidates.append(shutil.which(f"python{version}"))
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return candidate
    return None


def kernel_on(version, specs_dir):
    """The name of a kernelspec, written into ``specs_dir`` (add it to JUPYTER_PATH), whose kernel
    runs Python ``version`` in a venv with this checkout of sitq and ipykernel installed; the venv is
    made under .venv-kernels/ (and remade when pyproject.toml changes). None if no such Python exists."""
    python = find_python(version)
    if python is None:
        return None
    venv = KERNEL_VENVS / f"py{version}"
    stamp = venv / "sitq-installed"
    wanted = (REPO / "pyproject.toml").read_text()
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", f"{REPO}[notebook]",
                        "ipykernel"], check=True, capture_output=True)
        stamp.write_text(wanted)
    name = f"sitq-py{version}"
    spec = Path(specs_dir) / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {version} (sitq tests)", "language": "python"}))
    return name


# --- JupyterLab server --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(proc, url, log_path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited rc={proc.returncode}; log: {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"jupyter lab did not answer {url}; log: {log_path}")
        time.sleep(0.2)  # polling a server's readiness, not waiting for live behaviour


@contextmanager
def jupyter_lab(root_dir, log_path, theme=None, app="jupyterlab"):
    """Run JupyterLab (or Notebook 7: ``app="notebook"``) on 127.0.0.1 with a random token;
    yield (base_url, token). Config, data, runtime, settings and workspaces live in a temp
    dir. Stopped with /api/shutdown (which also stops its kernels), then by process group.
    ``theme``, e.g. "JupyterLab Dark", picks the theme (both apps share Lab's settings)."""
    port, token = free_port(), secrets.token_hex(16)
    home = Path(tempfile.mkdtemp(prefix="sitq-lab-"))
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"), IPYTHONDIR=str(home / "ipython"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
               JUPYTER_PLATFORM_DIRS="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no "get Jupyter news?" toast over the notebook
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    if theme:
        (settings / "themes.jupyterlab-settings").write_text(json.dumps({"theme": theme}))
    cmd = [sys.executable, "-m", app, "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root_dir}", "--allow-root"]  # CI runs as root
    if app == "notebook":  # Notebook 7 exposes its app (the helpers below need it) the same way
        cmd += ["--JupyterNotebookApp.expose_app_in_browser=True"]
    else:
        cmd += ["--LabApp.expose_app_in_browser=True",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, f"{base}/api/status?token={token}", log_path)
        yield base, token
    finally:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=5).close()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # only the group this helper started
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


# --- Playwright ---------------------------------------------------------------

def browser_available() -> bool:
    """True when Chromium can be driven; skip browser tests otherwise, unless
    SITQ_REQUIRE_BROWSER=1 (CI), where a missing browser is an error."""
    if os.path.exists(CHROMIUM):
        return True
    if os.environ.get("SITQ_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium")
    return False


@contextmanager
def chromium_page(width=1280, height=1000):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        # Playwright adds --headless and a fresh temporary --user-data-dir itself
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def open_notebook(page, base, token, path, timeout_ms=60_000, app="jupyterlab"):
    if app == "notebook":
        page.goto(f"{base}/notebooks/{path}?token={token}")
    else:
        page.goto(f"{base}/lab/tree/{path}?token={token}&reset")
    page.wait_for_function(KERNEL_READY, timeout=timeout_ms)


def run_all(page):
    """Start Run All and return at once. Returning the command's promise would
    make Playwright wait for the last cell, when the live part is over."""
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def cell_outputs(page) -> list[str]:
    return page.locator(".jp-Notebook .jp-Cell").evaluate_all(
        "cells => cells.map(c => (c.querySelector('.jp-OutputArea') || {innerText: ''}).innerText)")
