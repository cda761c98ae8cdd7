"""llama.cpp's server for the remote-inference tests: built once by bench/build-llama-server, run on loopback."""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 60.0


@functools.cache
def server_binary() -> tuple[Path | None, str]:
    """The llama-server binary (built on first use, cached), or None and why it cannot be built."""
    try:
        done = subprocess.run(["bash", str(ROOT / "bench" / "build-llama-server")], capture_output=True, text=True,
                              check=False)
    except OSError as exc:
        return None, f"cannot run bench/build-llama-server: {exc}"
    path = Path(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    if done.returncode != 0 or path is None or not path.is_file():
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        return None, f"llama-server could not be built (bench/build-llama-server exit {done.returncode}): {tail}"
    return path, ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One llama-server process on 127.0.0.1 with the demo model; `log` holds its output."""

    def __init__(self, binary: Path, model: Path, log: Path, *, ctx: int = 2048, slots: int = 2) -> None:
        self.binary, self.model, self.log = binary, model, log
        self.ctx, self.slots = ctx, slots
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it has loaded the model."""
        args = [str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                "-c", str(self.ctx), "-np", str(self.slots), "-t", "1", "--no-webui", "--cache-ram", "0"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log}")
            if self.get("/health") is not None:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llama-server did not start within {START_SECONDS:.0f} s; see {self.log}")

    def get(self, path: str) -> object | None:
        """GET a JSON answer, None unless the server answers 200."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        """POST JSON, return the JSON answer."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Stop the server if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
