"""`make lab`: JupyterLab starts headless from the checkout, lists the notebooks over its REST API and
shuts down cleanly, within a bounded time."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 180  # seconds; JupyterLab's first start on a busy 2-core machine takes a while
TOKEN = "roda-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_lab() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter"
    return [str(exe), "lab"] if exe.exists() else [sys.executable, "-m", "jupyterlab"]


def _get(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        return resp.status, json.loads(body) if body else None


def test_make_lab_target_exists():
    makefile = (REPO / "Makefile").read_text()
    assert "\nlab:" in makefile and "jupyter lab" in makefile


@pytest.mark.skipif(shutil.which("jupyter", path=str(Path(sys.executable).parent)) is None
                    and subprocess.run([sys.executable, "-c", "import jupyterlab"], check=False).returncode != 0,
                    reason="jupyterlab is not installed (pip install -r requirements.txt)")
def test_lab_lists_notebooks_and_shuts_down(tmp_path):
    port = _free_port()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    cmd = [*_jupyter_lab(), "--no-browser", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={REPO}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers run as root; make lab passes it too
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115  (closed in the finally block, after the server)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"jupyter lab exited early: {(tmp_path / 'lab.log').read_text()[-2000:]}"
            try:
                status, _ = _get(f"{base}/api/status")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"jupyter lab did not answer within {START_TIMEOUT} s"
            time.sleep(1.0)
        status, listing = _get(f"{base}/api/contents/notebooks")
        assert status == 200 and listing["type"] == "directory"
        names = {item["name"] for item in listing["content"]}
        expected = {p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")}
        assert expected and expected <= names
        status, nb = _get(f"{base}/api/contents/notebooks/{min(expected)}")
        assert status == 200 and nb["type"] == "notebook" and nb["content"]["cells"]
        with pytest.raises(urllib.error.HTTPError) as denied:  # the token is required
            urllib.request.urlopen(f"{base}/api/contents/notebooks", timeout=10)
        assert denied.value.code == 403
        _get(f"{base}/api/shutdown", method="POST")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
