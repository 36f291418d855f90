"""A real memory limit for one benchmark subprocess: a cgroup v1 memory group (needs root
and /sys/fs/cgroup/memory). The group charges the child's anonymous memory and the page
cache it fills (checkpoint reads, memory-mapped files), so "larger than memory" means the
kernel has to drop pages or kill the child. No swap on the machines this runs on, so
memory.memsw is left alone.

    r = run_limited([sys.executable, "worker.py"], 4 * 2**30, "bench")  # its JSON line + "cgroup"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def drop_caches() -> None:
    """Writes back dirty pages and drops the page cache, so a run starts from storage."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def available() -> str | None:
    """None when a memory group can be made here, else why not."""
    if not (ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {ROOT}"
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    return None


class MemoryLimit:
    """A fresh memory cgroup of `limit` bytes (None: unlimited, still measured), removed on
    exit once its processes are gone."""

    def __init__(self, name: str, limit: int | None):
        self.path, self.limit = ROOT / f"{name}-{os.getpid()}", limit

    def __enter__(self) -> MemoryLimit:
        self.path.mkdir()
        if self.limit:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        return self

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd`, started inside the group (the shell joins it, then execs the command)."""
        return ["bash", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "bash", *cmd]

    def stats(self) -> dict:
        read = lambda f: int((self.path / f).read_text())
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"limit_bytes": self.limit, "peak_bytes": read("memory.max_usage_in_bytes"),
                "failcnt": read("memory.failcnt"), "oom_kills": int(oom.get("oom_kill", 0))}

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the child may still be exiting
            if not (self.path / "cgroup.procs").read_text().strip():
                break
            time.sleep(0.1)
        self.path.rmdir()


def _run(cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    """`cmd`'s result; past `timeout` seconds it is killed and says so (return code None)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return subprocess.CompletedProcess(cmd, None, out(e.stdout), out(e.stderr) + f"\nnot finished after {timeout:.0f} s")


def run_limited(cmd: list[str], limit: int | None, name: str, timeout: float | None = None) -> dict:
    """Drops the caches, runs `cmd` in its own memory group of `limit` bytes and returns the
    JSON object on its last stdout line, with the group's numbers under "cgroup"; a failed
    run gives "error" and "stderr_tail" instead (an OOM kill says so, as does a run killed
    after `timeout` seconds). With no limit and no cgroups here (not root), `cmd` runs as it is."""
    if limit and (why := available()):
        raise RuntimeError(f"a memory limit needs a memory cgroup: {why}")
    if available():
        p, stats = _run(cmd, timeout), {}
    else:
        drop_caches()
        with MemoryLimit(name, limit) as group:
            p = _run(group.wrap(cmd), timeout)
            stats = group.stats()
    stats["oom_killed"] = p.returncode == -9 or stats.get("oom_kills", 0) > 0
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-15:]
        if stats["oom_killed"]:
            tail.append(f"killed (SIGKILL): out of memory under the {limit / 2**30:.2f} GiB limit" if limit
                        else "killed (SIGKILL)")
        print("\n".join(tail), file=sys.stderr)
        return {"error": tail[-1] if tail else f"exit {p.returncode}", "stderr_tail": tail, "cgroup": stats}
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "cgroup": stats}
