"""What the soak samples of the server from outside: /proc/<pid> (resident memory, threads,
descriptors), the size of its folders, and GPU memory through nvidia-smi. Linux only."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (bytes) and Threads of /proc/<pid>/status; {} when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss_bytes"] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out["threads"] = int(value)
    return out


def open_fds(pid: int) -> dict[str, int]:
    """Open descriptors of `pid`: all (open_fds), and without sockets (open_files)."""
    root = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(root)
    except OSError:
        return {}
    sockets = 0
    for name in names:
        try:
            sockets += os.readlink(root / name).startswith("socket:")
        except OSError:  # closed between the listing and the read
            pass
    return {"open_fds": len(names), "open_files": len(names) - sockets}


def fds_settled(pid: int, baseline: int, slack: int, timeout_s: float = 30.0) -> int:
    """Open descriptors of `pid` once within `slack` of `baseline`, or after `timeout_s`
    (closed connections take a moment to leave the server)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = open_fds(pid).get("open_fds", 0)
        if now <= baseline + slack or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def dir_usage(*roots: Path) -> tuple[int, int]:
    """(bytes, files) under the folders, links not followed; files vanishing meanwhile skipped."""
    total = files = 0
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    continue
                files += 1
    return total, files


class GpuMemory:
    """Device memory used by the server (nvidia-smi's per-process figure when it lists the
    server's pid; else the memory used on the visible GPUs, which the server alone uses)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tool = shutil.which("nvidia-smi")
        self.source = "nvidia-smi" if self.tool else "none"

    def _query(self, *args: str) -> list[list[str]]:
        done = subprocess.run(
            [self.tool, *args, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if done.returncode != 0:
            return []
        return [
            [c.strip() for c in line.split(",")]
            for line in done.stdout.splitlines()
            if line.strip()
        ]

    def read(self) -> int | None:
        """Bytes, or None without nvidia-smi (or when it fails)."""
        if not self.tool:
            return None
        try:
            apps = self._query("--query-compute-apps=pid,used_memory")
            mine = [int(r[1]) for r in apps if r[0] == str(self.pid) and r[1].isdigit()]
            if mine:
                self.source = "nvidia-smi per process"
                return sum(mine) * (1 << 20)
            gpus = self._query("--query-gpu=index,memory.used")
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        wanted = {v.strip() for v in visible.split(",") if v.strip().isdigit()}
        used = [int(r[1]) for r in gpus if (not wanted or r[0] in wanted)]
        if not used:
            return None
        self.source = "nvidia-smi memory.used of the visible GPUs"
        return sum(used) * (1 << 20)


def sample_process(pid: int, data_dir: Path, temp_dirs: list[Path], gpu: GpuMemory):
    """One sample of the server's resources (keys as soak_verdict.tolerances names them)."""
    sample: dict[str, float | None] = {**proc_status(pid), **open_fds(pid)}
    sample["data_bytes"], sample["data_files"] = dir_usage(data_dir)
    sample["temp_bytes"], sample["temp_files"] = dir_usage(*temp_dirs)
    sample["gpu_bytes"] = gpu.read()
    return sample
