"""A test's child process: a `python -m tests.<module>` that prints JSON events on stdout, read by a
thread so that waits can time out, and takes JSON commands on stdin."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Child:
    """A running child and the events it prints; its standard error goes to `log`."""

    def __init__(self, module: str, *args: str, log: Path) -> None:
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=log.parent, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def wait_for(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next event, which must be `name`."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {name!r} from the child within {timeout}s:\n{self.stderr()}") from None
        assert event["event"] == name, (event, self.stderr())
        return event

    def tell(self, **command: Any) -> None:
        """Send one command (a JSON line) to the child."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def send(self, sig: signal.Signals, timeout: float = 30.0) -> int:
        """Send `sig` and return the exit code (negative: killed by a signal)."""
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def stderr(self) -> str:
        return self.log.read_text()[-4000:]

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
