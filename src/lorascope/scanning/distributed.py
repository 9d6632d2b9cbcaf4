"""Split a scan's matrices over processes started by torchrun, and gather the records.

    torchrun --nproc-per-node 8 -m lorascope scan BASE ADAPTER --out scan_dir

Each rank scans its share of the matrix pairs on its own device (cuda:LOCAL_RANK, or the CPU),
then every rank receives all records in the single-process order; rank 0 writes the output.
Matrices are independent in Alg. 1, so the records equal a single-process scan's. The share is
balanced by the cost of each matrix's base decomposition (Gram product m·n·min(m, n) plus the
eigendecomposition min(m, n)³), largest first, each to the least loaded rank.

Only small Python objects cross processes, so the gloo backend serves CPUs and GPUs alike.
Outside torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import math
import os

import torch

from lorascope.io.checkpoint import Checkpoint
from lorascope.schema import MatrixRecord


def world() -> tuple[int, int]:
    """(rank, world size): from the initialised process group, else from torchrun's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    return world()[1] > 1


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo) if launched, and return this rank's device."""
    if not launched():
        return device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(_teardown)
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def matrix_cost(shape: tuple[int, ...]) -> float:
    """Relative cost of one matrix's base decomposition: m·n·min(m, n) + min(m, n)³."""
    m, n = shape[0], math.prod(shape[1:])
    p = min(m, n)
    return float(m * n * p + p**3)


def split(costs: list[float], n_ranks: int) -> list[list[int]]:
    """Indices per rank: largest cost first, each to the currently least loaded rank (LPT)."""
    loads = [0.0] * n_ranks
    shares: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in shares]


def share(pairs: list, base: Checkpoint) -> list:
    """This rank's pairs (all of them outside torchrun), in their original order."""
    rank, size = world()
    if size <= 1:
        return pairs
    costs = [matrix_cost(base.shape(p.name)) for p in pairs]
    return [pairs[i] for i in split(costs, size)[rank]]


def gather(records: list[MatrixRecord], pairs: list) -> list[MatrixRecord]:
    """All ranks' records on every rank, ordered as a single-process scan orders them."""
    if not launched():
        return records
    import torch.distributed as dist

    parts: list[list[MatrixRecord] | None] = [None] * world()[1]
    dist.all_gather_object(parts, records)
    order = {p.name: i for i, p in enumerate(pairs)}
    side = {"left": 0, "right": 1}
    merged = [r for part in parts for r in (part or [])]
    return sorted(merged, key=lambda r: (order[r.name], side.get(r.side, 2)))


def is_main() -> bool:
    return world()[0] == 0
