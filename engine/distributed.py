"""Process-group setup from torchrun or SLURM variables, device choice, collectives, teardown.

Where the variables come from, in order of precedence:

1. torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
2. a submitit job (``SUBMITIT_EXECUTOR`` set): ``submitit.helpers.TorchDistributedEnvironment``;
3. ``srun`` under sbatch (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, first host of
   ``SLURM_JOB_NODELIST``), read through submitit's ``SlurmJobEnvironment`` so node lists such
   as ``gpu[01-04,07]`` are expanded the same way; the port derives from the job id so that
   every task picks the same one without talking to each other;
4. otherwise a single process.

NCCL is used when the process drives a GPU, gloo otherwise (CPU tests, laptops).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single process"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by a launcher (torchrun, srun, submitit), which may have started a single process."""
        return self.source != "single process"

    @property
    def distributed(self) -> bool:
        """Several processes, or a launched one: then a process group exists and the model is wrapped in DDP
        (its BatchNorm synchronised), also for one process, so that a 1-GPU job (``torchrun
        --nproc-per-node 1``, one SLURM task, ``make gpu-check``) takes the multi-GPU job's code path."""
        return self.world_size > 1 or self.launched


def _port_for_job(job_id: str) -> int:
    # Same range as submitit's helper; a job id gives every task of the job the same port.
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 40000


def detect_env() -> DistEnv:
    """Rank, world size, local rank and rendezvous address of this process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun")
    if env.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        tde = TorchDistributedEnvironment()
        return DistEnv(rank=tde.rank, world_size=tde.world_size, local_rank=tde.local_rank,
                       local_world_size=tde.local_world_size, master_addr=tde.master_addr,
                       master_port=tde.master_port, source=f"submitit ({env['SUBMITIT_EXECUTOR']})")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # SLURM_STEP_ID: we run under srun. The batch script itself also sees SLURM_PROCID=0 and
        # SLURM_NTASKS=N, and must not wait for N-1 peers that will never come.
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        world = job.num_tasks
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _port_for_job(job.raw_job_id)
        return DistEnv(rank=job.global_rank, world_size=world, local_rank=job.local_rank,
                       local_world_size=world // max(job.num_nodes, 1),
                       master_addr=env.get("MASTER_ADDR", job.hostnames[0]), master_port=port,
                       source="slurm (srun)")
    return DistEnv()


# What says this process was given GPUs: SLURM's (--gpus, --gpus-per-node, --gpus-per-task, --gres=gpu) and
# CUDA's own. A value of these that means "no GPU" does not count.
GPU_ALLOCATION_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS",
                       "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
_NO_GPU_VALUES = ("", "-1", "NoDevFiles", "none")


def allocated_gpus() -> dict[str, str]:
    """The variables of :data:`GPU_ALLOCATION_VARS` that say this process was given GPUs (a SLURM count of 0 does
    not; ``CUDA_VISIBLE_DEVICES=0`` names GPU 0 and does)."""
    found = {}
    for key in GPU_ALLOCATION_VARS:
        value = os.environ.get(key, "").strip()
        if value in _NO_GPU_VALUES or (key.startswith("SLURM_") and value.rpartition(":")[2] == "0"):
            continue
        found[key] = value
    return found


def nvidia_driver() -> str:
    """The NVIDIA kernel driver's version line, or why it cannot be read."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return "no NVIDIA kernel driver loaded (/proc/driver/nvidia/version is missing)"


def cuda_unusable(allocated: dict[str, str]) -> str:
    """Why GPUs were allocated and torch sees none, and the fixes: the message of a run that would otherwise train
    on the CPU without a word (e.g. a torch build for a newer CUDA than the driver supports)."""
    given = ", ".join(f"{k}={v}" for k, v in allocated.items())
    return (f"GPUs were allocated to this process ({given}) but torch sees none: torch {torch.__version__} is built "
            f"for CUDA {torch.version.cuda or '(none: a CPU-only build)'}; NVIDIA driver: {nvidia_driver()}. Install "
            "a torch build the driver supports (or update the driver), or, to train on the CPU on purpose, set "
            "train.device=cpu")


def select_device(env: DistEnv, prefer: str = "auto") -> torch.device:
    """``cuda:<local rank>`` when a GPU is there (and wanted), else CPU.

    SLURM may already restrict each task to its own GPU (``--gpus-per-task``); then the task
    sees one device and uses ``cuda:0``. A process that was allocated GPUs (:func:`allocated_gpus`) but sees
    none stops with the reason (ConfigError) rather than train on the CPU: ``train.device=cpu`` says that is meant.
    """
    if prefer not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, not {prefer!r}")
    if prefer == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if allocated := allocated_gpus():
            raise ConfigError(cuda_unusable(allocated))
        if prefer == "cuda":
            raise ConfigError("train.device=cuda but torch sees no GPU and none was allocated to this process "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}; NVIDIA driver: "
                              f"{nvidia_driver()}): run on a GPU node, or set train.device=cpu or auto")
        return torch.device("cpu")
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init(env: DistEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group (no-op for a single process)."""
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # The host: on several nodes the log then shows which rank ran where (and that the master is rank 0's).
    log.info("rank %d/%d (local %d) on %s joining %s process group at %s:%d [%s]", env.rank, env.world_size,
             env.local_rank, socket.gethostname(), backend, env.master_addr, env.master_port, env.source)
    dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returns ``t``); identity in a single process."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. 'a signal arrived')."""
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def teardown() -> None:
    """Leave the process group; safe to call when none was created."""
    if is_initialized():
        dist.destroy_process_group()
