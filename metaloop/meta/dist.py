"""torch.distributed plumbing for meta-training: one process or many under torchrun.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) a process group is
started with NCCL when CUDA is available and gloo otherwise; without them everything
degrades to a world of one and no collective is called.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def restart_count(self) -> int:
        """How many times torchrun restarted this worker group (0 on the first attempt)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def setup(timeout_s: float = 1800.0) -> DistContext:
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistContext(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # torchrun keeps one TCP store for all restart attempts (its agent store), and the
        # default group's keys carry no attempt number: a restarted group can read the dead
        # group's addresses and fail to connect. Namespacing the store by attempt avoids it.
        # Only then: the restart count is each agent's own, so it disagrees across nodes once a
        # node's launcher is replaced (pytorch#135712). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        # (what multi-node restarts need, set by `metaloop.launch.torchrun_env`) rank 0 hosts a fresh store
        # every attempt and no prefix is wanted: one would make the nodes wait on different keys.
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"metaloop/attempt-{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local_rank, device, backend)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(t)
    return t.tolist()


def sync_grads(params: list[nn.Parameter], ctx: DistContext, row_sparse: list[nn.Parameter] = ()) -> None:
    """Sum gradients over ranks in one flat buffer. Missing (None) gradients count as zero
    on every rank, so all ranks feed the optimizer the same tensors.

    `row_sparse` parameters (the word embeddings: an episode touches a few hundred of ~30k
    rows) send only the rows some rank's gradient touches: a small all-reduce of row masks
    first, then those rows in the flat buffer. Rows no rank touched are zero everywhere, so
    the sum is the same; the buffer is about half as large for MiniLM.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ctx.distributed or not params:
        return
    sparse_ids = {id(p) for p in row_sparse if p.grad is not None and p.grad.dim() == 2}
    sparse = [p for p in params if id(p) in sparse_ids]
    rows: list[torch.Tensor] = []
    if sparse:
        masks = torch.cat([(p.grad != 0).any(1).float() for p in sparse])
        dist.all_reduce(masks)
        rows = [m.nonzero().squeeze(1) for m in masks.split([p.shape[0] for p in sparse])]
    picked = dict(zip(map(id, sparse), rows))
    parts = [p.grad[picked[id(p)]] if id(p) in picked else p.grad for p in params]
    flat = torch.cat([t.reshape(-1).float() for t in parts])
    dist.all_reduce(flat)
    offset = 0
    for p, part in zip(params, parts):
        n = part.numel()
        value = flat[offset : offset + n].view_as(part)
        if id(p) in picked:
            p.grad[picked[id(p)]] = value.to(p.grad.dtype)
        else:
            p.grad.copy_(value)
        offset += n


def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Make every rank hold rank 0's parameters and buffers."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_gather_object(obj, ctx: DistContext) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer, by name: equal digests = identical tensors."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of (run seed, step, rank): dropout noise is a function of position in the
    run, so a resumed run replays exactly what an uninterrupted one would have done."""
    raw = hashlib.sha256(f"metaloop:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << 63) - 1)
