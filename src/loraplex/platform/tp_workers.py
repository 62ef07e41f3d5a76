"""TensorParallelWorkers: rank 0's handle on the other ranks of a tensor-parallel engine, and
`run_worker`, the loop each of those ranks runs in a process of its own.

Rank 0 (the engine, in the server's process) decides every step; before running it, it sends
the step to the workers (a header, then the packed batch, over the gloo control group), and
every rank runs the same forward, meeting in the model's collectives. Adapter writes travel the
same way, each worker receiving only its shard. A watchdog thread on rank 0 notices a worker
that exits, logs which one and why, and aborts the groups so that no rank waits forever: the
next step fails and the engine thread stops (the server then reports not ready).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .batch import ScheduledBatch
from .config import EngineConfig, ModelSpec
from .engine_dir import open_engine_dir
from .engine_shard import build_shard
from .lora_slots import LoraWeights, shard_lora_weights
from .parallel import TensorParallel, join, leave
from .tp_wire import BatchReceiver, BatchSender, pack_adapter, unpack_adapter

log = logging.getLogger(__name__)

_STEP, _LOAD, _CLEAR, _STOP = 1, 2, 3, 4
# Long enough for every rank to load a large checkpoint before the first collective.
JOIN_TIMEOUT_S = 1800.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or could not start; the engine cannot go on."""


@dataclass(frozen=True)
class WorkerArgs:
    config: EngineConfig
    spec: ModelSpec
    dtype: torch.dtype
    max_model_len: int
    rank: int
    world_size: int
    port: int
    device_type: str


def rank_device(device_type: str, rank: int) -> torch.device:
    """Rank r runs on GPU r (or on the CPU)."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


class TensorParallelWorkers:
    """Ranks 1..N-1 of an engine: started with `start`, fed with `send_step` and friends."""

    def __init__(
        self,
        processes: list[multiprocessing.Process],
        tp: TensorParallel,
        spec: ModelSpec,
    ) -> None:
        self.processes = processes
        self.tp = tp
        self.spec = spec
        self.failure: str | None = None
        self._stopping = False
        self._steps = BatchSender()  # what the workers hold of each request's blocks
        self._watchdog = threading.Thread(
            target=self._watch, name="loraplex-tp-watchdog", daemon=True
        )

    @classmethod
    def start(
        cls, args: WorkerArgs, world_size: int
    ) -> tuple[TensorParallelWorkers, TensorParallel]:
        """Spawn ranks 1..world_size-1 and join them as rank 0 (`args` with rank 0)."""
        port = _free_port()
        context = multiprocessing.get_context("spawn")
        processes = []
        for rank in range(1, world_size):
            worker_args = WorkerArgs(**{**args.__dict__, "rank": rank, "port": port})
            process = context.Process(
                target=run_worker,
                args=(worker_args,),
                name=f"loraplex-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            processes.append(process)
        device = rank_device(args.device_type, 0)
        tp = join(0, world_size, port, device, JOIN_TIMEOUT_S)
        workers = cls(processes, tp, args.spec)
        workers._watchdog.start()
        log.info(
            "tensor parallel: %d ranks on %s (worker pids %s)",
            world_size,
            args.device_type,
            ",".join(str(p.pid) for p in processes),
        )
        return workers, tp

    def send_step(self, batch: ScheduledBatch) -> None:
        """Tell every worker to run `batch` (rank 0 runs it right after)."""
        payload = self._steps.pack(batch)
        self._command(_STEP, payload.numel())
        dist.broadcast(payload, src=0, group=self.tp.control)

    def load_adapter(self, slot: int, weights: LoraWeights) -> None:
        """Send each worker its shard of an adapter for `slot` (rank 0 wrote its own)."""
        self._command(_LOAD, slot)
        for rank in range(1, self.tp.world_size):
            shard = shard_lora_weights(
                weights, self.spec, TensorParallel(rank, self.tp.world_size)
            )
            description, scales, values = pack_adapter(shard)
            sizes = torch.tensor([description.shape[0], values.numel()])
            for tensor in (sizes, description, scales, values):
                dist.send(tensor, rank, group=self.tp.control)

    def clear_slot(self, slot: int) -> None:
        self._command(_CLEAR, slot)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the workers (each leaves the group and exits), then leave the group."""
        if self._stopping:
            return
        self._stopping = True
        if self.failure is None:
            try:
                self._command(_STOP, 0)
            except (RuntimeError, TensorParallelError):
                log.warning("tensor parallel: workers did not take the stop command")
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                log.warning(
                    "tensor parallel: %s did not stop; killing it", process.name
                )
                process.kill()
                process.join(5)
        # Bounded: a teardown stuck in NCCL must not keep the server from exiting.
        leaving = threading.Thread(
            target=leave, args=(self.tp,), name="loraplex-tp-leave", daemon=True
        )
        leaving.start()
        leaving.join(timeout_s)
        if leaving.is_alive():
            log.error("tensor parallel: leaving the process group did not finish")

    def _command(self, command: int, argument: int) -> None:
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        header = torch.tensor([command, argument], dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.tp.control)

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stopping:
            return
        process = sentinels[ready[0]]
        process.join(1)
        self.failure = (
            f"tensor-parallel worker {process.name} (pid {process.pid}) exited with "
            f"code {process.exitcode}; the engine cannot go on: restart the server"
        )
        log.error("%s", self.failure)
        try:  # unblock rank 0 if it waits in a collective with the dead worker
            dist.distributed_c10d._abort_process_group()
        except Exception:
            log.debug("aborting the process group failed", exc_info=True)


def run_worker(args: WorkerArgs) -> None:
    """A worker rank's life: join, build its shard, then run what rank 0 sends until stop."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s",
    )
    try:
        device = rank_device(args.device_type, args.rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tp = join(args.rank, args.world_size, args.port, device, JOIN_TIMEOUT_S)
        shard = build_shard(
            args.config,
            args.spec,
            device=device,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            built=open_engine_dir(args.config.model),  # rank 0 checked it already
            tp=tp,
        )
        _serve(shard, tp)
        leave(tp)
    except BaseException:
        log.exception("tensor-parallel rank %d failed", args.rank)
        logging.shutdown()
        os._exit(1)  # not sys.exit: CUDA and NCCL teardown at exit can hang
    logging.shutdown()
    os._exit(0)


def _serve(shard, tp: TensorParallel) -> None:
    header = torch.zeros(2, dtype=torch.int64)
    steps = BatchReceiver()
    while True:
        dist.broadcast(header, src=0, group=tp.control)
        command, argument = header.tolist()
        if command == _STEP:
            payload = torch.empty(argument, dtype=torch.int64)
            dist.broadcast(payload, src=0, group=tp.control)
            shard.runner.forward(steps.unpack(payload))
        elif command == _LOAD:
            shard.lora_slots.write_shard(argument, _receive_adapter(tp))
        elif command == _CLEAR:
            shard.lora_slots.clear(argument)
        elif command == _STOP:
            shard.runner.close()
            return
        else:
            raise TensorParallelError(f"unknown command {command} from rank 0")


def _receive_adapter(tp: TensorParallel) -> LoraWeights:
    sizes = torch.empty(2, dtype=torch.int64)
    dist.recv(sizes, 0, group=tp.control)
    num_modules, num_values = sizes.tolist()
    description = torch.empty(num_modules, 6, dtype=torch.int64)
    scales = torch.empty(num_modules, dtype=torch.float64)
    values = torch.empty(num_values, dtype=torch.float32)
    for tensor in (description, scales, values):
        dist.recv(tensor, 0, group=tp.control)
    return unpack_adapter(description, scales, values)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
