"""`loraplex serve` in a child process for soak.py and load_streams.py: started on a free port
with a temp folder of its own (TMPDIR, so that spooled uploads are measured), read through
/metrics, and stopped with SIGTERM (its drain) then SIGKILL.

On a GPU: the model directory's shapes with `--load-format dummy`, bf16, CUDA graphs; on the
CPU (`smoke=True`): float32, same code path, tiny shapes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ADMIN_KEY = "bench-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

# `python -m loraplex` that gets SIGTERM when the thread that started it dies, even by
# SIGKILL (Linux's PR_SET_PDEATHSIG, kept across exec), so that a benchmark cut short never
# leaves a server holding the GPU. Start servers from the main thread.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'loraplex', *sys.argv[1:]])\n"
)

# What counts a call in flight, as /metrics shows it: all 0 once the server is idle.
IDLE_GAUGES = (
    ("vllm:num_requests_running", None),
    ("vllm:num_requests_waiting", None),
    ("loraplex_adapter_slots", "pinned"),
    ("loraplex_admission_waiting", None),
    ("loraplex_admission_seats", "used"),
    ("loraplex_admission_tenant_calls", None),  # every tenant
)


def card_name() -> tuple[str, str]:
    """(the GPU's full name, its short name for file names), or ("cpu", "cpu"). Asked of
    nvidia-smi: CUDA in this process would take GPU memory from the server's plan."""
    tool = shutil.which("nvidia-smi")
    if tool:
        done = subprocess.run(
            [tool, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        names = done.stdout.strip().splitlines()
        if done.returncode == 0 and names:
            name = names[0].strip()
            short = next(
                (c for c in ("h200", "h100", "a100") if c in name.lower()), "gpu"
            )
            return name, short
    return "cpu", "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) → value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def busy_gauges(samples: dict[tuple[str, tuple], float]) -> dict[str, float]:
    """The in-flight gauges of IDLE_GAUGES that are not 0 (empty: the server is idle)."""
    busy = {}
    for (name, labels), value in samples.items():
        for gauge, state in IDLE_GAUGES:
            if (
                name == gauge
                and (state is None or ("state", state) in labels)
                and value
            ):
                busy[f"{name}{dict(labels)}"] = value
    return busy


class ServerProcess:
    """`loraplex serve MODEL_DIR` with `options` (flag → value; True for a bare flag)."""

    def __init__(
        self,
        model_dir: Path,
        data_dir: Path,
        temp_dir: Path,
        log: Path,
        options: dict[str, object],
        smoke: bool,
        extra: list[str] = (),
        start_timeout_s: float = 900.0,
    ) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir, self.temp_dir, self.log_path = data_dir, temp_dir, log
        temp_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "loraplex", "serve", str(model_dir)]
        command += ["--load-format", "dummy", "--port", str(port)]
        command += ["--data-dir", str(data_dir), "--served-model-name", "base"]
        device = {"--device": "cpu", "--dtype": "float32"}
        if not smoke:
            device = {"--device": "cuda", "--dtype": "bfloat16"}
        for flag, value in {**device, **options}.items():
            command += [flag] if value is True else [flag, str(value)]
        command += list(extra)
        self.command = command  # what runs; started through _LAUNCH
        env = {
            **os.environ,
            "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(temp_dir),
        }
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, *command[3:]],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        try:
            self.start_s = self._wait_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> float:
        started = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}); see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"the server was not ready in {timeout_s} s")
            time.sleep(0.5)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def samples(self, timeout: float = 30.0) -> dict[tuple[str, tuple], float]:
        """/metrics now (admin key)."""
        response = httpx.get(f"{self.url}/metrics", headers=ADMIN, timeout=timeout)
        response.raise_for_status()
        return metric_samples(response.text)

    def wait_idle(self, timeout_s: float = 60.0) -> tuple[dict[str, float], float]:
        """Wait until the in-flight gauges read 0: (those still busy at the end, seconds)."""
        started = time.perf_counter()
        while True:
            busy = busy_gauges(self.samples())
            waited = time.perf_counter() - started
            if not busy or waited > timeout_s:
                return busy, waited
            time.sleep(0.5)

    def stop(self) -> int | None:
        """SIGTERM (the server drains), SIGKILL after 60 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def serve_options(args, per_tenant: int) -> dict:
    """`loraplex serve` options of the soak and the stream test: the pool and batch from
    `args`, a deep queue, and `per_tenant` calls in flight per tenant at most."""
    return {
        "--max-loras": args.slots,
        "--max-lora-rank": args.rank,
        "--max-cpu-loras": args.cpu_loras,
        "--max-num-seqs": args.seqs,
        "--max-queued-requests": 4096,
        "--max-model-len": args.prompt_len + args.output_len + 64,
        "--max-concurrent-per-tenant": per_tenant,
        "--adapter-wait-timeout": 120,
        "--shutdown-timeout": 5,
    }
