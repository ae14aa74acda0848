"""Data-parallel training inside one node (hf backend): what a training build needs to run unchanged
under ``torchrun --nproc_per_node W`` (RANK / LOCAL_RANK / WORLD_SIZE in the environment).

- Same examples per optimizer step as one process: the config's ``batch_size * grad_accum`` is the
  global batch; ``per_device_batch`` splits it over the ranks (the micro-batch is kept and the gradient
  accumulation divided when it can be, else the micro-batch is divided). The Trainer's seeded sampler is
  the same permutation on every rank and accelerate deals its micro-batches out round-robin, so a step
  takes the same consecutive examples as on one process. The exception: an epoch's last, partial step
  is topped up by accelerate (``even_batches``) with examples from the epoch's start so every rank has
  as many micro-batches.
- Same loss: the Trainer sums the label tokens of all micro-batches of a step over all ranks
  (``average_tokens_across_devices``, on by default in transformers 5) and scales each rank's loss by
  the world size, which DDP's gradient averaging undoes: the step's loss and gradient are the
  token-weighted mean over the step's examples, as on one process.
- One writer: only rank 0 writes files (adapter, merged model, train log, the node's outputs); the other
  ranks train, take part in the evaluations (collective), then ``wait_for_main`` until rank 0 is done.
  Rank 0 also builds or downloads the base model before the others read it (``main_first``).

Launch (dagtune/node_process.py does this for a node section with ``gpus: k > 1``): the same node spec
for every rank, ``CUDA_VISIBLE_DEVICES`` = the node's k GPUs, and ``python -m torch.distributed.run
--standalone --nproc_per_node=k -m dagtune.node_process <spec>``; each rank calls the node's build
function, which joins the group (NCCL on CUDA, gloo on CPU) on GPU ``LOCAL_RANK``. Every rank returns
metrics; rank 0's are the node's.

Known differences from one process: LoRA dropout masks come from each rank's own random stream (the
loss is the same, the gradient the same in expectation); the SFT nodes' ``val_loss`` is the Trainer's
per-batch mean, and accelerate tops the last validation batch up with repeated rows (the classifier
computes its validation loss from the gathered logits instead: exact); resuming under torchrun on CPU
fails inside transformers 5.17 (it loads the optimizer state with ``map_location='cpu:N'``, which
``torch.load`` rejects) -- on CUDA the location is ``cuda:N``.

Nothing here imports torch at module level (the planner imports the training modules).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

# Rank 0 may spend a long time writing the merged model while the others wait: that wait runs on a
# gloo group of its own with this timeout (NCCL's collective timeout is 10-30 minutes).
WAIT_TIMEOUT = timedelta(hours=6)
# The default group's timeout, as TrainingArguments' ddp_timeout default.
COLLECTIVE_TIMEOUT = timedelta(seconds=1800)

_WAIT_GROUP: Any = None
T = TypeVar("T")


class World(NamedTuple):
    rank: int
    local_rank: int
    world_size: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(
            f"environment variable {name}={value!r} is not an integer (set by torchrun)"
        ) from None


def world() -> World:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) outside it."""
    w = World(_env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))
    if w.world_size < 1 or not 0 <= w.rank < w.world_size:
        raise RuntimeError(f"inconsistent torchrun environment: RANK={w.rank}, WORLD_SIZE={w.world_size}")
    return w


def is_distributed() -> bool:
    return world().world_size > 1


def is_main() -> bool:
    """Whether this process writes the node's files (rank 0, or the only process)."""
    return world().rank == 0


def per_device_batch(
    examples_per_step: int, micro_batch: int, world_size: int, where: str = "optim"
) -> tuple[int, int]:
    """(per-device micro-batch, per-device gradient accumulation) that keep ``examples_per_step``
    examples in every optimizer step over ``world_size`` ranks: the largest micro-batch up to
    ``micro_batch`` (the configured one: what fits in memory) that divides the per-rank share.
    ``where`` names the config section in the error."""
    if examples_per_step % world_size:
        raise ValueError(
            f"{where}: batch_size * grad_accum = {examples_per_step} examples per optimizer step cannot be "
            f"split evenly over {world_size} GPUs; make it a multiple of {world_size}"
        )
    share = examples_per_step // world_size
    micro = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    return micro, share // micro


def process_group(device: str) -> None:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) with this rank's GPU as its device,
    before the model loads; the Trainer (accelerate) then uses this group. A no-op outside torchrun."""
    global _WAIT_GROUP
    w = world()
    if w.world_size == 1:
        return
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(w.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if _WAIT_GROUP is None:
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def barrier() -> None:
    """Every rank reaches this point before any goes on (no-op on one process)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "ddp.barrier() before the process group exists: call ddp.process_group(device) first"
        )
    dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks: for what fills a shared cache (the base model built
    into the artifact store, a hub snapshot downloaded). Not only to spare the work: with the process
    group up, transformers' ``save_pretrained`` writes nothing on a rank other than 0, so a model built
    there would be committed without its weights."""
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


def wait_for_main() -> None:
    """The end of a node under torchrun: rank 0 arrives once its files are written, the other ranks wait
    for it here (on the long-timeout gloo group), so no rank exits while the node is still writing."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if _WAIT_GROUP is None:
        raise RuntimeError("ddp.wait_for_main() before ddp.process_group(device)")
    dist.barrier(group=_WAIT_GROUP)


def describe(per_device: tuple[int, int], examples_per_step: int) -> dict[str, Any]:
    """The manifest's record of how the node was spread."""
    return {
        "world_size": world().world_size,
        "per_device_batch_size": per_device[0],
        "per_device_grad_accum": per_device[1],
        "examples_per_step": examples_per_step,
    }
