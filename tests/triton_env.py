"""A real Triton Inference Server for the tests: its own virtual environment, its backends, its process.

The server is the tritonserver 2.51 that ``nvidia-pytriton`` bundles (with Triton's Python backend and
stubs for each Python version); it runs on the CPU. It lives in its own venv, not the project's: the
Python stub needs numpy < 2 (with numpy 2 models load READY but FP32 outputs come back empty and BYTES
inputs crash the stub), and pytriton's own dependencies are not needed (installed with ``--no-deps``).

    python tests/triton_env.py        # build the venv (CI runs this before pytest); prints its path

The venv is ``$DEWEY_TRITON_VENV``, default ``~/.cache/dewey/triton-venv``; a ``.complete`` file marks a
finished install, so an interrupted one is redone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VENV_ENV = "DEWEY_TRITON_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "dewey" / "triton-venv"
COMPLETE_MARKER = ".complete"
PYTRITON = "nvidia-pytriton==0.7.0"
# What the stub's Python needs: the text model's (runtimes: numpy < 2, tokenizers, the recursive splitter),
# the emulated onnxruntime backend's, and the test's client.
SERVER_PACKAGES = ("numpy<2", "tokenizers>=0.23,<0.24", "semantic-text-splitter>=0.33,<0.34", "onnxruntime",
                   "tritonclient[http]")
INSTALL_TIMEOUT_S = 600
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10
HERE = Path(__file__).resolve().parent
EMULATED_ONNXRUNTIME_MODEL = HERE / "triton_onnxruntime_model.py"


class ServerUnavailable(RuntimeError):
    """The server's venv could not be built, or the server did not come up: the reason says which."""


def venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV, DEFAULT_VENV))


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(log=print) -> Path:
    """The server's venv, built with this interpreter's Python version (the stub must match it)."""
    venv = venv_path()
    if (venv / COMPLETE_MARKER).is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    log(f"Building the Triton server venv in {venv} (about 470 MB)")
    steps = ([sys.executable, "-m", "venv", str(venv)],
             [str(venv_python(venv)), "-m", "pip", "install", "-q", "--no-deps", PYTRITON],
             [str(venv_python(venv)), "-m", "pip", "install", "-q", *SERVER_PACKAGES])
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ServerUnavailable(f"{' '.join(step)} ran over {INSTALL_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise ServerUnavailable(f"{' '.join(step)} failed: {done.stderr.strip()[-2000:]}")
    (venv / COMPLETE_MARKER).write_text("", encoding="utf-8")
    return venv


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def server_environment(venv: Path) -> dict:
    """The stub embeds the venv's Python: its bin first on PATH (the stub finds its prefix there), its
    libpython's folder and pytriton's bundled libraries on LD_LIBRARY_PATH (without them the stub fails
    to start or model loading hangs)."""
    libdir = subprocess.run([str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [libdir, str(site_packages(venv) / "nvidia_pytriton.libs"),
                                                    env.get("LD_LIBRARY_PATH")]))
    return env


def prepare_backends(venv: Path, folder: Path) -> Path:
    """A backend directory: the Python backend with the stub of the venv's Python version (what pytriton
    does), and ``onnxruntime`` as a Python-based backend (tests/triton_onnxruntime_model.py)."""
    server = site_packages(venv) / "pytriton" / "tritonserver"
    version = subprocess.run([str(venv_python(venv)), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    backends = folder / "backends"
    shutil.copytree(server / "backends" / "python", backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub",
                 backends / "python" / "triton_python_backend_stub")
    (backends / "onnxruntime").mkdir()
    shutil.copy2(EMULATED_ONNXRUNTIME_MODEL, backends / "onnxruntime" / "model.py")
    return backends


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonServer:
    """tritonserver on 127.0.0.1 (ephemeral ports) serving ``repository``; a context manager that stops
    it by its PID (SIGINT, then SIGKILL after STOP_TIMEOUT_S). Auto-complete is off: configs must be
    complete."""

    def __init__(self, venv: Path, repository: Path, workdir: Path):
        self.venv, self.repository, self.workdir = venv, repository, workdir
        self.http_port = free_port()
        self.log_path = workdir / "tritonserver.log"
        self.process = None
        self.ready_seconds = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def __enter__(self) -> TritonServer:
        binary = site_packages(self.venv) / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        command = [str(binary), f"--model-repository={self.repository}",
                   f"--backend-directory={prepare_backends(self.venv, self.workdir)}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={free_port()}", "--allow-metrics=false",
                   "--disable-auto-complete-config", "--strict-readiness=true", f"--exit-timeout-secs={STOP_TIMEOUT_S}"]
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=server_environment(self.venv), start_new_session=True)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, started: float) -> None:
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                raise ServerUnavailable(f"tritonserver exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=1) as answer:
                    if answer.status == 200:
                        self.ready_seconds = time.perf_counter() - started
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ServerUnavailable(f"tritonserver not ready after {READY_TIMEOUT_S} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S + 5)
        except subprocess.TimeoutExpired:
            # The stubs run in the server's session: kill the group only when the server itself hung.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def __exit__(self, *exc_info) -> None:
        self.stop()


if __name__ == "__main__":
    print(ensure_venv(log=lambda message: print(message, file=sys.stderr)))
