"""Data-parallel training under torchrun: one process per device, each owning a contiguous slice
of the batch's B parallel streams; DistributedDataParallel averages the gradients.

    torchrun --nproc-per-node W -m rnnlm train ...          (gloo on CPU, NCCL on cuda:LOCAL_RANK)

    batchify(train, B): (N, B)           rank 0 of W = 2      rank 1 of W = 2
         B=0 1 2 3                        [ a g ]              [ m s ]
     t=0 [ a g m s ]          ->          [ b h ]              [ n t ]      columns [r·B/W, (r+1)·B/W)
       1 [ b h n t ]                       ...                  ...

Each rank carries its own streams' state through truncated BPTT, and the union of the ranks'
streams is exactly the single-process batch. Every rank's loss is its own streams' mean over the
batch (B/W of them), summed or averaged over time as TrainConfig.loss says, plus the same L2 term,
so the mean of the ranks' gradients (what DDP's all-reduce computes during backward) is the
single-process gradient over all B streams. Clipping runs after backward, on the averaged
gradient, so every rank clips the same global norm and takes the same step.

Only rank 0 touches the output directory, reads included: it loads the resume state and
broadcasts it, and writes every file. Whatever only one rank can know (a non-finite loss, a
signal, rank 0's clock, an error on rank 0) is shared by a collective, so that all ranks leave
the loop at the same step and none waits forever in a collective the others have left.

Every collective has a timeout (``RNNLM_COLLECTIVE_TIMEOUT`` seconds, default 1800, as torch's):
a rank stuck in one, or left alone in one by a rank that died, fails with a message naming it.

Leaving the group takes care of one hazard of gloo. DDP's Reducer holds the process group from
C++, and the gradient all-reduces it starts inside backward carry a Python object in their
thread-local state (the contextvars context that torch stashes there during backward), so a gloo
worker thread needs the GIL to drop the last reference to one. If the Reducer is the last owner of
the group, freeing it (when an exception's traceback is released, or by the cyclic garbage
collector) runs ~ProcessGroupGloo, which joins the worker threads while holding the GIL: a worker
still releasing such a work then waits for the GIL forever, and this rank hangs while the others
wait for it in the next rendezvous. That is what hung tests/test_distributed.py when only rank 1
saw an infinite loss. So :meth:`Comm.close` drops DDP's Reducer and its handle of the group, while
the group is still registered, before :func:`process_group` destroys the group: torch's Python
handle of the group then frees it last, there and then, and releases the GIL while the threads
join. (Left to a later garbage collection, or to interpreter exit, a worker thread that needs the
GIL during finalization aborts the process: "terminate called without an active exception".)
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from rnnlm.errors import RnnlmError

T = TypeVar("T")
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VAR = "RNNLM_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; a validation on rank 0 must fit in it


class ReportedByRank0(RnnlmError):
    """An error rank 0 hit and reports; the other ranks raise this copy so that they stop too.
    The CLI exits with its code without printing it again."""


def collective_timeout() -> datetime.timedelta:
    """How long any collective may wait: ``$RNNLM_COLLECTIVE_TIMEOUT`` seconds, else 30 minutes."""
    text = os.environ.get(TIMEOUT_VAR, "").strip()
    if not text:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise RnnlmError(f"{TIMEOUT_VAR}={text!r}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class World:
    """Where this process stands: rank ``rank`` of ``size``, device index ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def streams(self, batch_size: int) -> tuple[int, int]:
        """This rank's columns [lo, hi) of the B parallel streams."""
        if batch_size % self.size:
            raise RnnlmError(f"batch_size {batch_size} does not split evenly over {self.size} processes: use a "
                             f"multiple of {self.size} (--set batch_size=...) or another --nproc-per-node")
        per = batch_size // self.size
        return self.rank * per, (self.rank + 1) * per


def detect(distributed: bool | None = None) -> World:
    """Read torchrun's environment. ``None``: data-parallel when torchrun started more than one
    process; ``True``: insist on torchrun; ``False``: refuse to run as one of several processes
    (each would train alone and write the same checkpoint). One process is always a plain run."""
    present = {k: os.environ[k] for k in TORCHRUN_VARS if os.environ.get(k)}
    if not present:
        if distributed:
            raise RnnlmError("distributed training needs torchrun: torchrun --nproc-per-node N -m rnnlm train ...")
        return World()
    try:
        size = int(present.get("WORLD_SIZE", "1"))
        rank, local_rank = int(present.get("RANK", "0")), int(present.get("LOCAL_RANK", "0"))
    except ValueError:
        raise RnnlmError(f"torchrun's environment is not integers: {present}") from None
    if size <= 1:
        return World()
    if distributed is False:
        raise RnnlmError(f"WORLD_SIZE={size}: this is one of {size} processes, and without data parallelism each "
                         "would train alone and overwrite the same checkpoint; allow distributed training "
                         "or run one process")
    missing = [k for k in TORCHRUN_VARS if k not in present]
    if missing:
        raise RnnlmError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: start the processes with torchrun")
    if not 0 <= rank < size:
        raise RnnlmError(f"RANK={rank} is outside 0..{size - 1}")
    return World(rank=rank, size=size, local_rank=local_rank)


def rank_device(world: World, device: torch.device) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` (and the current device)."""
    if not world.parallel or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise RnnlmError(f"LOCAL_RANK={world.local_rank} but torch sees {torch.cuda.device_count()} CUDA devices: "
                         "start at most one process per GPU (--nproc-per-node)")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[Comm]:
    """Join the process group (gloo for CPU tensors, NCCL for CUDA ones) and leave it on exit.

    A group the caller already initialised (a script that runs its own DDP) is used and left alone.
    """
    if not world.parallel:
        yield Comm(world, device)
        return
    timeout = collective_timeout()
    owned = not dist.is_initialized()
    if owned:
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    rank=world.rank, world_size=world.size, timeout=timeout)
        except (RuntimeError, ValueError) as e:  # the rendezvous timed out, or the address is unusable
            raise _comm_error(world, "joining the process group", timeout, e) from None
    elif (dist.get_rank(), dist.get_world_size()) != (world.rank, world.size):
        raise RnnlmError(f"the initialised process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                         f"but the environment says rank {world.rank} of {world.size}")
    comm = Comm(world, device, timeout)
    try:
        yield comm
    except RuntimeError as e:
        if not _is_comm_failure(e):
            raise
        raise _comm_error(world, "a collective of training (DDP's gradient all-reduce)", timeout, e) from None
    finally:
        comm.close()  # first: the Reducer must not outlive the group's registration (module docstring)
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _is_comm_failure(e: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo and NCCL say so in a RuntimeError)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        marker in text for marker in ("Timed out", "timed out", "Connection closed", "pair closure", "NCCL", "gloo"))


def _comm_error(world: World, what: str, timeout: datetime.timedelta, e: BaseException) -> RnnlmError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RnnlmError(f"rank {world.rank} of {world.size}: {what} failed: {first}. Another rank is stuck or "
                      f"has stopped; every collective waits at most {timeout.total_seconds():g} s "
                      f"(set {TIMEOUT_VAR} in seconds to change that)", code=1)


class Comm:
    """The collectives training needs. With one process each is the identity and sends nothing, so
    the single-process program is the same code with every exchange a no-op."""

    def __init__(self, world: World, device: torch.device,
                 timeout: datetime.timedelta = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)) -> None:
        self.world, self.device, self.timeout = world, device, timeout
        self.rank, self.size, self.parallel = world.rank, world.size, world.parallel
        self.main = world.rank == 0
        self._ddp: Any = None

    def close(self) -> None:
        """Drop DDP's hold on the group: its Reducer (and the Logger that holds that) so that the Reducer
        cannot be the group's last owner, and its Python handle, so that destroying the group frees it
        now, its threads joined, and not at some later garbage collection or at interpreter exit."""
        if self._ddp is not None:
            for name in ("logger", "reducer", "process_group"):
                if hasattr(self._ddp, name):
                    delattr(self._ddp, name)
            self._ddp = None

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        """Run one collective; a timeout or a lost peer becomes an RnnlmError naming this rank."""
        try:
            return fn()
        except RuntimeError as e:
            if not _is_comm_failure(e):
                raise
            raise _comm_error(self.world, what, self.timeout, e) from None

    def shard(self, data: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
        """This rank's streams of batchified data: (N, B) -> (N, B / W), contiguous rows."""
        lo, hi = self.world.streams(data.shape[1])
        return data if not self.parallel else np.ascontiguousarray(data[:, lo:hi])

    def dropout_seed(self, seed: int) -> int:
        """A seed of its own per rank, derived from the run's seed (rank 0's differs from ``seed`` too)."""
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1, np.uint64)[0] >> 1)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around the model (it broadcasts rank 0's parameters now, all-reduces gradients in backward)."""
        if not self.parallel:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = self._collective("DDP's broadcast of rank 0's weights", lambda: DistributedDataParallel(
            model, device_ids=ids, output_device=ids[0] if ids else None))
        return self._ddp

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._collective("an all-reduce of the step's flags", lambda: dist.all_reduce(t, op=op))
        return [float(v) for v in t.tolist()]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values] if not self.parallel else self._reduce(values, dist.ReduceOp.SUM)

    def all_max(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values] if not self.parallel else self._reduce(values, dist.ReduceOp.MAX)

    def main_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: for decisions read from rank 0's clock."""
        return bool(self.all_max([flag if self.main else False])[0])

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` in rank order on rank 0 (``None`` elsewhere). CPU tensors inside, please."""
        if not self.parallel:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.main else None
        self._collective("gathering the ranks' resume state", lambda: dist.gather_object(obj, out, dst=0))
        return out

    def on_main(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on rank 0 only and hand its result to every rank; if it raises, every
        rank raises (the same RnnlmError, with its exit code) instead of waiting in the next collective."""
        if not self.parallel:
            return fn(*args)
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                box[0] = ("ok", fn(*args))
            except RnnlmError as e:
                error, box[0] = e, ("error", e.message, e.code)
            except BaseException as e:
                error, box[0] = e, ("error", f"rank 0 failed: {type(e).__name__}: {e}", 1)
        self._collective("waiting for rank 0 (validation, checkpoint files)",
                         lambda: dist.broadcast_object_list(box, src=0))
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise ReportedByRank0(box[0][1], code=box[0][2])
        result: T = box[0][1]
        return result
