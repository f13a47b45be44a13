"""Child processes of the dev harness: each in its own session (process group), ended with all it started.

One way to stop a process group (``stop_group``: SIGTERM, wait, SIGKILL), used by the scenario's
processes, the control plane and the vLLM server; the pod runner's container kills add the
``MARK_ENV`` search for processes that left their group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Set in every pod runner container: "<runner id>/<pod uid>/<container>/", to find processes that left the group.
MARK_ENV = "SEEDFORK_PODRUNNER_MARK"


def kill_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; one that is gone already is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(proc: subprocess.Popen, grace: float, sig: int = signal.SIGTERM) -> None:
    """End the process group ``proc`` leads: ``sig``, up to ``grace`` s for it to exit, then SIGKILL.

    SIGKILL goes to the group even when the leader exited within the grace: children of its group may
    linger, and they must not outlive it.
    """
    if proc.poll() is None:
        kill_group(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    kill_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def kill_marked(prefix: str, sig: int, skip_groups: Collection[int] = ()) -> int:
    """Signal every process whose environment carries MARK_ENV starting with ``prefix``; returns how many.

    A container's processes can leave its process group (``setsid``, a new session
    for an engine); they still inherit the mark, so they end with the container.
    Linux only (reads /proc); elsewhere process groups are all there is. Processes in
    ``skip_groups`` are left alone (their group is signalled already: one signal each).
    """
    wanted = f"{MARK_ENV}={prefix}".encode()
    hits = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            if any(item.startswith(wanted) for item in environ.split(b"\0")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    pid = int(entry.name)
                    if os.getpgid(pid) not in skip_groups:
                        os.kill(pid, sig)
                        hits += 1
    return hits


def child_env(kubeconfig: Path | str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for our child processes: this interpreter's bin dir first on PATH (``seedfork-agent``
    lives there), unbuffered output for the logs, and the kubeconfig."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """A child process in its own session, logging to a file; ``stop()`` ends its whole process group."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env or None,
                cwd=REPO,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.popen is None:
            return
        stop_group(self.popen, timeout, sig)
        self.popen = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to clean up."""
        self.stop(timeout=5, sig=signal.SIGKILL)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
