"""One switch for data parallelism: ``distributed.strategy: none | ddp | fsdp | deepspeed``.

The training loops never branch on the strategy: they call :func:`init` once, build their model
and optimizer, and ask :func:`wrap` for a :class:`Runner` that does forward/backward/step the way
the strategy needs. Launch multi-process runs with ``torchrun --nproc_per_node N -m zoo.cli ...``
(or ``deepspeed``); a single process (no ``WORLD_SIZE``) runs the same code with world size 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class DistEnv:
    strategy: str
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int) -> tuple[int, int]:
        """(offset, size) of this process's rows in a global batch (which must divide evenly)."""
        if global_batch % self.world:
            raise ValueError(f"the global batch ({global_batch}) must be divisible by the number of processes "
                             f"({self.world}); change optim.batch_size / train.batch_size")
        b = global_batch // self.world
        return self.rank * b, b


def init(strategy: str = "none", backend: str = "auto", device: str = "auto") -> DistEnv:
    """Read torchrun's environment and start the process group when there is more than one process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and strategy == "none":
        raise ValueError(f"launched with {world} processes but distributed.strategy=none; set "
                         "distributed.strategy=ddp (or fsdp / deepspeed)")
    if world > 1 and not dist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=be)
    return DistEnv(strategy, rank, world, local_rank, dev)


class Runner:
    """Single-process runner: the module as it is, a torch optimizer, optional gradient clipping."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv):
        self.module = module
        self.inner = module
        self.optimizer = optimizer
        self.env = env

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad(self, max_norm: float) -> float:
        params = [p for p in self.inner.parameters() if p.grad is not None]
        if max_norm <= 0 or not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) module state; every process must call it (collective under FSDP)."""
        return self.inner.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def ema_into(self, teacher: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (same names)."""
        t_params = dict(teacher.named_parameters())
        pairs = [(t_params[n], p) for n, p in self.inner.named_parameters() if n in t_params]
        if not pairs:
            return
        t, s = zip(*pairs)
        torch._foreach_mul_(list(t), momentum)
        torch._foreach_add_(list(t), [x.detach() for x in s], alpha=1 - momentum)


def wrap(env: DistEnv, module: nn.Module, make_optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
         param_groups: Callable[[nn.Module], list[dict[str, Any]]], cfg: dict[str, Any]) -> Runner:
    """A :class:`Runner` for ``env.strategy`` around ``module`` (already on ``env.device``).

    ``param_groups(module)`` gives the optimizer's groups for the module the strategy trains (it may
    be a wrapped or sharded copy); ``make_optimizer(groups)`` makes the torch optimizer.
    """
    if env.strategy == "none" or env.world == 1 and env.strategy in ("ddp",):
        return Runner(module, make_optimizer(param_groups(module)), env)
    raise ValueError(f"distributed.strategy={env.strategy} is not available in this build")


def barrier(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.barrier()


def all_gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Rows of every process, concatenated in rank order; gradients flow back to each owner."""
    if env.world == 1:
        return x
    import torch.distributed.nn.functional as dnf

    return torch.cat(dnf.all_gather(x), dim=0)
