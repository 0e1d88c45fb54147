"""One rank of the loopback tests of lowbit's gradient hook (tests/test_distributed.py runs it
under torchrun with 2 processes, gloo): ``python dist_worker.py OUT_DIR``; each rank runs
every case and writes OUT_DIR/rankR.json with what it measured."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit.training.config import GradConfig
from lowbit.training.distributed import WireBytes
from lowbit.training.grad_compress import QuantizedAllReduce, dequantize_groups, quantize_groups, quantized_allreduce, quantized_allreduce_hook


def local_gradient(rank: int, n: int, seed: int = 0) -> torch.Tensor:
    """A rank's gradient: heavy-tailed values, as gradients are, different on each rank."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 1e-3


def bound(world_gradients: list[torch.Tensor], bits: int, group: int) -> torch.Tensor:
    """Per value, the most two nearest roundings can be off: half a step of each rank's group
    in phase 1 (averaged over the ranks), then half a step of the group of what phase 1
    delivered, plus float32 rounding."""
    world, n = len(world_gradients), world_gradients[0].numel()
    pad = (-n) % (world * group)
    phase1, step1 = [], 0
    for g in world_gradients:
        codes, scales = quantize_groups(torch.nn.functional.pad(g, (0, pad)), bits, group)
        phase1.append(dequantize_groups(codes, scales, group))
        step1 = step1 + scales.repeat_interleave(group) / world
    step2 = quantize_groups(sum(phase1) / world, bits, group)[1].repeat_interleave(group)
    return (step1 / 2 + step2 / 2)[:n] * (1 + 1e-5) + 1e-12


def case_mean(rank: int, world: int) -> dict:
    out = {}
    for bits in (8, 4):
        n = 10_000  # not a multiple of world * group: the padding is exercised
        grads = [local_gradient(r, n) for r in range(world)]
        true_mean = sum(grads) / world
        state = QuantizedAllReduce(GradConfig(bits=bits, group_size=128, scale_dtype="float32", error_feedback=False))
        got = quantized_allreduce(state, grads[rank].clone())
        error = (got - true_mean).abs()
        limit = bound(grads, bits, 128)
        out[bits] = {"max_excess": (error - limit).max().item(), "max_error": error.max().item(),
                     "scale": true_mean.abs().max().item(), "counted": state.bytes_sent}
    return out


def case_feedback(rank: int, world: int) -> dict:
    """The same gradient every step: without error feedback the rounding's error repeats
    and adds up; with it the residual carries the lost part into the next step."""
    out = {}
    n, steps = 4096, 60
    g = local_gradient(rank, n, seed=1)
    true_mean = sum(local_gradient(r, n, seed=1) for r in range(world)) / world
    for feedback in (False, True):
        state = QuantizedAllReduce(GradConfig(bits=4, error_feedback=feedback))
        total = torch.zeros(n)
        drift = []
        for step in range(1, steps + 1):
            total += quantized_allreduce(state, g.clone())
            drift.append((total - step * true_mean).norm().item() / true_mean.norm().item())
        out[str(feedback)] = drift
    return out


def case_bytes(rank: int, world: int) -> dict:
    """Bytes on the socket for a plain fp32 all-reduce and for the hook at 8 and 4 bits."""
    n = 1 << 20
    g = local_gradient(rank, n)
    before = WireBytes.now()
    dist.all_reduce(g.clone())
    out = {"fp32": WireBytes.now() - before}
    for bits in (8, 4):
        state = QuantizedAllReduce(GradConfig(bits=bits, group_size=128, scale_dtype="float32"))
        before = WireBytes.now()
        quantized_allreduce(state, g.clone())
        out[f"int{bits}"] = WireBytes.now() - before
        out[f"int{bits} counted"] = state.bytes_sent
    mean = g.clone()
    dist.all_reduce(mean)
    mean /= world
    for name, config in (("int4", GradConfig(bits=4, group_size=128, scale_dtype="float32")), ("int4 g32 bf16", GradConfig(bits=4))):
        state = QuantizedAllReduce(config)
        before = WireBytes.now()
        reduced = quantized_allreduce(state, g.clone())
        if name != "int4":
            out[name], out[f"{name} counted"] = WireBytes.now() - before, state.bytes_sent
        out[f"{name} relative error"] = ((reduced - mean).norm() / mean.norm()).item()
    return out


def case_ddp(rank: int, world: int) -> dict:
    """The hook inside DistributedDataParallel: each parameter's gradient is the mean of the
    ranks' gradients within the quantisation's bound."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 32))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(10 + rank))
    model(x).square().mean().backward()
    local = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    true_mean = sum(gathered) / world
    model.zero_grad()
    ddp = DistributedDataParallel(model)
    state = QuantizedAllReduce(GradConfig(bits=8, error_feedback=False))
    ddp.register_comm_hook(state, quantized_allreduce_hook)
    ddp(x).square().mean().backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {"relative_error": ((got - true_mean).norm() / true_mean.norm()).item(), "counted": state.bytes_sent,
            "numel": local.numel()}


CASES = {"mean": case_mean, "feedback": case_feedback, "bytes": case_bytes, "ddp": case_ddp}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {name: case(rank, world) for name, case in CASES.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
