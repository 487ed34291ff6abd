"""One switch for data parallelism: ``distributed.strategy: none | ddp | fsdp | deepspeed``.

The training loops never branch on the strategy: they call :func:`init` once, build their model
and optimizer, and ask :func:`wrap` for a :class:`Runner` that does forward/backward/step the way
the strategy needs. Launch multi-process runs with torchrun::

    torchrun --nproc_per_node 2 -m zoo.cli pretrain dinomx/cpu.yaml distributed.strategy=ddp

or with DeepSpeed's launcher (on CPU too, where ``--num_gpus`` counts processes)::

    deepspeed --num_gpus 2 --no_local_rank --module zoo.cli pretrain dinomx/cpu.yaml distributed.strategy=deepspeed

A single process (no ``WORLD_SIZE``) runs the plain :class:`Runner` whatever the strategy: with
one process every strategy computes the same thing.

What each strategy trains, and how the rest of the run sees it:

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`; every process holds the whole model.
* ``fsdp``: PyTorch FSDP2 (``fully_shard``) on each block of every ``nn.ModuleList`` (the
  transformer blocks) and on the root; parameters, gradients and optimizer state are sharded.
* ``deepspeed``: ZeRO stage ``distributed.zero_stage`` (2: gradients and optimizer state sharded;
  3: parameters too) around the loop's own torch optimizer (no DeepSpeed C++ op is built).
  Clipping happens inside DeepSpeed's step with the norm the loop asks for.

The global batch (``optim.batch_size``, ``train.batch_size``) is split across the processes; the
losses reduce their batch statistics across processes, so a run computes what one process would
on the whole batch (MedAlmighty's batch norm excepted on CPU, where SyncBatchNorm is unavailable).
Checkpoints are full (unsharded) state dicts under every strategy, so they load with any number
of processes. Frozen modules that follow the student (the DINO EMA teacher) stay plain,
unsharded modules on every process; :meth:`Runner.ema_into` gathers the student's shards for them.
"""

from __future__ import annotations

import atexit
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
    """Where this process stands: strategy, rank, world size, and its device."""

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

    def split(self, n: int) -> tuple[int, int]:
        """(offset, size) of this process's rows in a batch of ``n`` that need not divide evenly.

        The first ``n % world`` processes take one row more (``torch.tensor_split``'s rule); a
        process may get no row when ``n < world``.
        """
        base, extra = divmod(n, self.world)
        size = base + (self.rank < extra)
        return self.rank * base + min(self.rank, extra), size


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
        # Torn down before the interpreter's own shutdown: a process group left to C++ static
        # destructors can abort the process at exit (and torchrun then reports a finished run failed).
        atexit.register(_destroy_process_group)
    return DistEnv(strategy, rank, world, local_rank, dev)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Runner:
    """Single-process runner: the module as it is, a torch optimizer, optional gradient clipping.

    Attributes:
        module: what the loop calls for the forward pass (a wrapper under DDP / DeepSpeed).
        inner: the user's module (parameters by their original names; sharded in place by FSDP).
        optimizer: has the ``param_groups`` the loop sets ``lr`` / ``weight_decay`` on each step.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv):
        self.module = module
        self.inner = module
        self.optimizer = optimizer
        self.env = env

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps (for lr schedulers); ``optimizer`` itself except under DeepSpeed."""
        return self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad(self, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm`` (0 = off); returns the norm before clipping."""
        params = [p for p in self.inner.parameters() if p.grad is not None]
        if max_norm <= 0 or not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def drop_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Leave ``params`` out of the coming :meth:`step`: no update, no weight decay, no optimizer state."""
        for p in params:
            p.grad = None

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) module state; every process must call it (collective when sharded).

        Complete on the main process; sharded strategies return it only there (others get ``{}``).
        """
        return self.inner.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full state (as :meth:`model_state` gives); every process passes the whole of it."""
        self.inner.load_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state (collective when sharded; complete on the main process)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def ema_pairs(self, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher parameters, student parameters) matched by name."""
        t_params = dict(teacher.named_parameters())
        pairs = [(t_params[n], p) for n, p in self.inner.named_parameters() if n in t_params]
        return [t for t, _ in pairs], [p for _, p in pairs]

    @torch.no_grad()
    def ema_into(self, teacher: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (same names)."""
        t, s = self.ema_pairs(teacher)
        if t:
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, [x.detach() for x in s], alpha=1 - momentum)


class DDPRunner(Runner):
    """DistributedDataParallel: gradients averaged across processes during backward."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv):
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: the set of parameters a step uses never changes in these loops, and it
        # tolerates parameters no step uses (the mask token when iBOT is off) without searching the
        # autograd graph every step as find_unused_parameters would.
        ddp = DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                      static_graph=True)
        super().__init__(ddp, optimizer, env)
        self.inner = module


def _shard_units(module: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards on their own: every element of every ``nn.ModuleList`` (transformer
    blocks, found by structure as the backbones do), innermost first, so a block's parameters are
    gathered only while that block runs."""
    units = [m for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst
             if any(p.requires_grad for p in m.parameters())]
    depth = {m: n.count(".") for n, m in module.named_modules()}
    return sorted(dict.fromkeys(units), key=lambda m: -depth.get(m, 0))


class FSDPRunner(Runner):
    """PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded across processes."""

    def __init__(self, module: nn.Module, make_optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
                 param_groups: Callable[[nn.Module], list[dict[str, Any]]], env: DistEnv):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world,))
        for unit in _shard_units(module):
            fully_shard(unit, mesh=mesh)
        fully_shard(module, mesh=mesh)
        # The optimizer is made after sharding: it must hold the sharded (DTensor) parameters.
        super().__init__(module, make_optimizer(param_groups(module)), env)

    def clip_grad(self, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        params = [p for p in self.inner.parameters() if p.grad is not None]
        if max_norm <= 0 or not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # reduced over the shards
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.inner, options=self._options())

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.inner, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.inner, self.optimizer, options=self._options())

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Not strict: a parameter that has not been stepped yet (the DINO prototype layer during its
        # freeze) has no optimizer state, in the saved run as in this one.
        set_optimizer_state_dict(self.inner, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))

    @torch.no_grad()
    def ema_into(self, teacher: nn.Module, momentum: float) -> None:
        from torch.distributed.tensor import DTensor

        # The teacher is a plain module on every process; each student parameter is gathered in
        # turn (one all-gather each, the traffic of one forward pass) so no full copy is held.
        t_params = dict(teacher.named_parameters())
        for n, p in self.inner.named_parameters():
            if n in t_params:
                s = p.full_tensor() if isinstance(p, DTensor) else p
                t_params[n].mul_(momentum).add_(s.detach(), alpha=1 - momentum)


class DeepSpeedRunner(Runner):
    """DeepSpeed ZeRO stage 2 or 3 around a torch optimizer; full-state checkpoints.

    ``optimizer.param_groups`` are the groups the torch optimizer steps with (one flat tensor per
    group), so ``lr`` / ``weight_decay`` set by the loop reach it. Gradient clipping is done by
    DeepSpeed inside :meth:`step` (``clip_grad`` sets the norm; DeepSpeed's formula is torch's).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, stage: int):
        import deepspeed

        if stage not in (1, 2, 3):
            raise ValueError(f"distributed.zero_stage must be 1, 2 or 3, got {stage}")
        if env.device.type == "cpu":
            # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce kernel on start
            # (a minute, and a C++ toolchain) that serves only its inference all-reduce; ZeRO
            # communicates through torch.distributed. Marking the op unavailable skips the build
            # (and DeepSpeed's probing of every op with compiler subprocesses).
            import deepspeed.ops

            vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
        config = {
            # The loops feed each process its own rows; DeepSpeed only needs a consistent micro-batch
            # for its bookkeeping (no DeepSpeed data loader is used).
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,  # the loop's own torch.optim.AdamW: no C++ op to build
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        engine, zero_opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
        super().__init__(engine, zero_opt, env)
        self.engine = engine
        self.inner = module
        self.stage = stage
        self._dropped: list[nn.Parameter] = []
        self._relinked = False

    # -- the step -------------------------------------------------------------------------------
    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer  # the ZeRO optimizer steps this one, group dicts shared

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def clip_grad(self, max_norm: float) -> float:
        self.optimizer.clip_grad = max(float(max_norm), 0.0)  # applied by DeepSpeed inside step()
        if max_norm <= 0:
            return 0.0
        return float(self._grad_norm())

    def _grad_norm(self) -> torch.Tensor:
        # The norm DeepSpeed's step will clip with, computed now over the reduced gradient partitions
        # (fp32 training: loss scale 1), so the loop logs the same number as under the other runners.
        from deepspeed.runtime.utils import combine_grad_norm_groups

        if self.stage == 3:
            return combine_grad_norm_groups(self.optimizer._get_norm_groups())
        return self.optimizer.scaled_global_norm()

    def drop_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Leave ``params`` as they are through the coming step, as the other runners do by dropping their grads.

        ZeRO updates flat partitions, so the gradients cannot be left out; what the step changes is
        put back after it instead. A parameter group whose parameters are all dropped (DINO-MX keeps
        its prototype layers in a group of their own, :func:`training.dinomx.model.param_groups`)
        gets its whole optimizer state back, Adam's step counter included: its first real update
        then has the bias correction of a first step, exactly as under torch's per-parameter state.
        For a dropped parameter that shares a group with trained ones only the parameter and its
        moments can be restored (the step counter belongs to the group), so its first updates
        after such a freeze would be scaled by the group's bias correction. The dropped parameters
        still count in the norm that clipping uses, as under the other runners.
        """
        self._dropped = [p for p in params if p.requires_grad]

    def step(self) -> None:
        dropped = {id(p) for p in self._dropped}
        whole = [(ps, flat) for ps, flat in self._flat_groups() if ps and all(id(p) in dropped for p in ps)]
        in_whole = {id(p) for ps, _ in whole for p in ps}
        states = [(flat, self._snapshot_state(flat)) for _, flat in whole]
        saved = [self._snapshot(p, moments=id(p) not in in_whole) for p in self._dropped]
        self.engine.step()
        for flat, st in states:
            self._restore_state(flat, st)
        for p, sv in zip(self._dropped, saved):
            self._restore(p, sv)
        self._dropped = []

    def _flat_groups(self) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
        """(module parameters, the fp32 flat partition the torch optimizer steps for them), per group / sub-group."""
        if self.stage == 3:
            return list(zip(self.optimizer.fp16_groups, self.optimizer.fp32_partitioned_groups_flat))
        return list(zip(self.optimizer.bit16_groups, self.optimizer.single_partition_of_fp32_groups))

    def _snapshot_state(self, flat: torch.Tensor) -> dict[str, torch.Tensor] | None:
        st = self.optimizer.optimizer.state.get(flat)
        if not st:
            return None
        return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}

    def _restore_state(self, flat: torch.Tensor, saved: dict[str, torch.Tensor] | None) -> None:
        """Put a flat partition's optimizer state back as it was before the step (in place: ZeRO keeps
        views of these tensors); a state this very step created goes back to a fresh one (step 0, zeros)."""
        st = self.optimizer.optimizer.state.get(flat)
        if not st:
            return
        for k, v in st.items():
            if not torch.is_tensor(v):
                if saved is not None and k in saved:
                    st[k] = saved[k]
                continue
            if saved is not None and k in saved:
                v.copy_(saved[k])
            else:
                v.zero_()  # torch's Adam starts a parameter at step 0 with zero moments

    def _state_keys(self) -> list[str]:
        """Names of the optimizer's per-element state (``exp_avg``, ``exp_avg_sq``); [] before the first step."""
        st = self._base_state()
        keys = [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0] if st else []
        if keys and self.stage != 3 and not self._relinked:
            # ZeRO-1/2 link each parameter to its slice of the optimizer state once, right after the
            # first group's first step, when the other groups have no state yet (DeepSpeed 0.19.8);
            # link again, now that every group has its state (the tensors are updated in place after).
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
            self._relinked = True
        return keys

    def _base_state(self) -> dict[str, Any] | None:
        flats = self._flat_partitions()
        return self.optimizer.optimizer.state.get(flats[0]) if flats else None

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 flat partitions the torch optimizer steps (one per parameter group / sub-group)."""
        if self.stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return list(self.optimizer.single_partition_of_fp32_groups)

    def _snapshot(self, p: nn.Parameter, moments: bool = True) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out: dict[str, Any] = {"param": safe_get_full_fp32_param(p).clone(), "moments": moments}
        if moments:
            for k in self._state_keys():
                out[k] = safe_get_full_optimizer_state(p, k).clone()
        return out

    def _restore(self, p: nn.Parameter, saved: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, saved["param"])
        if saved["moments"]:  # a parameter in a partly dropped group: its moments (the counter is the group's)
            for k in self._state_keys():  # moments created by this very step go back to zero
                safe_set_full_optimizer_state(p, saved.get(k, torch.zeros_like(saved["param"])), k)
        self._set_module_param(p, saved["param"])

    def _set_module_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Write ``value`` into the module's copy of ``p`` (what forward uses), as well as the fp32 master."""
        if self.stage == 3:
            import deepspeed

            # Every process writes the same value (a parameter below DeepSpeed's persistence
            # threshold is not partitioned, and is not broadcast on exit either).
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.view_as(p))
        else:
            p.data.copy_(value.view_as(p))

    # -- EMA and checkpoints --------------------------------------------------------------------
    def _gathered(self, params: list[nn.Parameter]):
        import contextlib

        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    @torch.no_grad()
    def ema_into(self, teacher: nn.Module, momentum: float) -> None:
        t, s = self.ema_pairs(teacher)
        if not t:
            return
        with self._gathered(s):  # ZeRO-3: the full student parameters, for the duration of the update
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, [x.detach() for x in s], alpha=1 - momentum)

    def model_state(self) -> dict[str, torch.Tensor]:
        with self._gathered(list(self.inner.parameters())):  # ZeRO-3: the whole model, briefly
            if not self.env.is_main:
                return {}
            return {k: v.detach().cpu().clone() for k, v in self.inner.state_dict().items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        import contextlib

        if self.stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(list(self.inner.parameters()), modifier_rank=0)
        else:
            ctx = contextlib.nullcontext()
        with ctx:  # ZeRO-3: loaded on the main process, partitioned again from it on exit
            self.inner.load_state_dict(state)
        self.optimizer.refresh_fp32_params()  # the optimizer's fp32 master copy follows the module

    def optimizer_state(self) -> dict[str, Any]:
        """``{"step": [...], "param_groups": [...], "state": {name: {"exp_avg": full tensor, ...}}}``."""
        from deepspeed.utils import safe_get_full_optimizer_state

        keys = self._state_keys()
        state = {}
        for n, p in self.inner.named_parameters():
            if p.requires_grad and keys:
                full = {k: safe_get_full_optimizer_state(p, k) for k in keys}  # collective: every process
                if self.env.is_main:
                    state[n] = {k: v.detach().cpu().clone() for k, v in full.items()}
        steps = [float(self.optimizer.optimizer.state[f]["step"]) if f in self.optimizer.optimizer.state else 0.0
                 for f in self._flat_partitions()]
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"format": f"deepspeed-zero{self.stage}-full", "step": steps, "param_groups": groups, "state": state}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        want = f"deepspeed-zero{self.stage}-full"
        if state.get("format") != want:
            raise ValueError(f"the checkpoint's optimizer state is {state.get('format', 'a torch state dict')!r}, "
                             f"not {want!r}; resume with the distributed settings it was written with")
        for g, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            g.update(saved)
        if not state["state"]:
            return
        keys = sorted(next(iter(state["state"].values())))
        base = self.optimizer.optimizer
        # torch optimizers create their state at the first step; make it now so it can be filled.
        for f, step in zip(self._flat_partitions(), state["step"]):
            if f not in base.state or not base.state[f]:
                base.state[f] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(f) for k in keys}}
            base.state[f]["step"] = torch.tensor(float(step))
        self._state_keys()  # links each parameter to its slice of the state just made
        for n, p in self.inner.named_parameters():
            if n in state["state"]:
                for k in keys:
                    safe_set_full_optimizer_state(p, state["state"][n][k].to(self.env.device), k)


def wrap(env: DistEnv, module: nn.Module, make_optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
         param_groups: Callable[[nn.Module], list[dict[str, Any]]], cfg: dict[str, Any]) -> Runner:
    """A :class:`Runner` for ``env.strategy`` around ``module`` (already on ``env.device``).

    ``param_groups(module)`` gives the optimizer's groups for the module the strategy trains (it may
    be a wrapped or sharded copy); ``make_optimizer(groups)`` makes the torch optimizer. ``cfg`` is
    the run's config; its ``distributed`` section is read (``zero_stage`` for DeepSpeed).
    """
    if env.strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {env.strategy!r}")
    if env.strategy == "none" or env.world == 1:
        return Runner(module, make_optimizer(param_groups(module)), env)
    if env.strategy == "ddp":
        return DDPRunner(module, make_optimizer(param_groups(module)), env)
    if env.strategy == "fsdp":
        return FSDPRunner(module, make_optimizer, param_groups, env)
    stage = int(cfg.get("distributed", {}).get("zero_stage", 2))
    return DeepSpeedRunner(module, make_optimizer(param_groups(module)), env, stage)


def from_main(value: Any, env: DistEnv) -> Any:
    """The main process's ``value`` on every process; it also waits for the main process to get here."""
    if env.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.barrier()


def average(values: dict[str, torch.Tensor], env: DistEnv) -> dict[str, float]:
    """Scalar tensors averaged over processes (one all-reduce), as floats: what a log row reports.

    The losses are built so that the mean of the per-process values is the single-process value
    on the whole global batch, so the averaged row is what one process would have logged.
    """
    if env.world == 1 or not dist.is_initialized():
        return {k: float(v.detach()) for k, v in values.items()}
    t = torch.stack([v.detach().float().reshape(()) for v in values.values()]).to(env.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / env.world).tolist()))


def total(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Per-process numbers summed over processes (one all-reduce, float64); unchanged with one process."""
    if env.world == 1 or not dist.is_initialized():
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def all_gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Rows of every process, concatenated in rank order; gradients flow back to each owner."""
    if env.world == 1:
        return x
    import torch.distributed.nn.functional as dnf

    return torch.cat(dnf.all_gather(x), dim=0)
