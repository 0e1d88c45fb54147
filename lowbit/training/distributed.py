"""Multi-process training on torch.distributed: the launch through torchrun, the process
group, the DistributedDataParallel wrapper with its gradient hook, and the bytes each rank
puts on the wire.

`lowbit finetune --nproc N` runs torchrun's launcher (``torchrun --standalone --nproc-per-node
N -m lowbit.cli finetune ...``, the same arguments) in its own process; torchrun gives each
process its RANK and WORLD_SIZE, and `Parallel.from_environment` joins them into one gloo
group (NCCL on GPUs). Every rank builds the same model from the same seed; the trainer draws
each global batch from the one seeded generator and gives rank r its r-th slice, so with fp32
gradients N processes compute what one process computes on the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lowbit.errors import LowbitError
from lowbit.training.config import GradConfig


def launched_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def launch(argv: list[str], processes: int) -> int:
    """Run ``lowbit <argv>`` as ``processes`` ranks under torchrun's launcher on this machine
    and wait; returns 0, or the first failing rank's exit status (the launcher stops the
    others). The launcher is called in this process, not through its command line, whose
    parser would take ``--nproc`` in ``argv`` for its own ``--nproc-per-node``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "lowbit.cli"])
    launcher.training_script_args = list(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))  # the ranks share the cores
    try:
        run(launcher)
    except ChildFailedError as err:
        return next((failure.exitcode for failure in err.failures.values() if failure.exitcode), 1)
    return 0


class WireBytes:
    """Bytes this process has written to files and sockets (``wchar`` of /proc/self/io, which
    counts gloo's socket writes); None where the kernel does not provide it. Read around the
    backward pass it measures the gradient traffic of one step, headers included."""

    PATH = "/proc/self/io"

    @classmethod
    def now(cls) -> int | None:
        try:
            with open(cls.PATH) as f:
                for line in f:
                    if line.startswith("wchar:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None


@dataclass
class Parallel:
    """This process's place in a multi-process run: rank, world size, and the hook's state
    once `wrap` has installed it."""

    rank: int
    world: int
    grad: GradConfig
    hook_state: object = None

    @classmethod
    def from_environment(cls, grad: GradConfig, processes: int) -> Parallel | None:
        """Join the process group torchrun set up (None for a single process)."""
        placed = launched_rank()
        if placed is None or processes == 1:
            return None
        rank, world = placed
        if world != processes:
            raise LowbitError(f"torchrun started {world} processes but --nproc asks for {processes}; launch through `lowbit finetune --nproc`")
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return cls(rank, world, grad)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (batch, ctx); the batch splits evenly (TrainConfig checks)."""
        return batch.chunk(self.world)[self.rank]

    def wrap(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        """``model`` in DistributedDataParallel with the gradient hook of ``grad`` installed."""
        from torch.nn.parallel import DistributedDataParallel

        from lowbit.training.grad_compress import register_grad_hook

        ddp = DistributedDataParallel(model)
        self.hook_state = register_grad_hook(ddp, self.grad, seed)
        return ddp

    def counted_bytes(self) -> int | None:
        """The bytes lowbit's hook counted as sent so far (None for torch's hooks)."""
        return getattr(self.hook_state, "bytes_sent", None)

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (the step's loss over the global batch)."""
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item() / self.world
