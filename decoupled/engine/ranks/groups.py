"""Stage groups: which ranks hold which blocks.

The network's blocks are cut into consecutive stage groups (dist.placement); group g is held by
R_g ranks (dist.replicas), its replicas, numbered 0..R_g-1 in rank order. Ranks are numbered group
after group, so [2, 1, 1] is ranks 0-1 (group 0), rank 2 (group 1), rank 3 (group 2).

Which replica takes what (`share`, by the feed's `batch_index`, feed.py): in sync, batch b of an epoch (and evaluation
batch b) goes to replica b mod R of every group, so a replica of group g+1 receives batch b from
replica b mod R_g of group g, and the order in which it reads its upstream links is known in
advance: runs are deterministic, and an epoch that does not divide by R ends with a padded round
(stepping.py). In async, training batches go by their global source step t = epoch x S + b
instead: the replicas, which step together, then stream alternately across epoch ends and none
falls behind. End-of-epoch, evaluation and stop markers go from every upstream replica to every
downstream one.

Note [split replicas]. With dist.replica_batch="split" every replica of a group takes every training
batch instead, its rows `rows(n, replica, R)` of the batch's n (torch.tensor_split's parts: the first
n mod R replicas take one row more; a batch smaller than R leaves the last replicas an empty part),
so a group steps once per batch on the whole batch, as DDP's ranks do. A replica sends its rows'
outputs to the downstream replicas that take them (`split_route`), and a downstream replica joins
its rows from the upstream replicas that hold them (`split_sources`), in row order. Which replicas
exchange rows must not depend on a batch's size (the receiver reads its links in a fixed order), so
neighbouring groups hold equal replica counts (replica i to replica i) or one of them a single rank
(config/schema.split_layout_check). An empty part still travels, as a message of no rows: a replica
that has none joins its group's all-reduce with n = 0 (stepping.AllReduce.join_empty), as the
reference's round closes with that slot empty. Evaluation batches still alternate (whole batches:
the forward of a part need not equal the rows of the whole batch's forward bit for bit), and
markers go to every replica as above. The simultaneous reference splits each batch into the same
parts, one slot each (flow.feed), so sync equals it bit for bit here too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    blocks: list[list[int]]  # the blocks of each stage group
    replicas: list[int]  # the ranks holding each stage group

    @property
    def size(self) -> int:
        return sum(self.replicas)

    def ranks(self, group: int) -> list[int]:
        first = sum(self.replicas[:group])
        return list(range(first, first + self.replicas[group]))

    def group_of(self, rank: int) -> int:
        for g in range(len(self.replicas)):
            if rank in self.ranks(g):
                return g
        raise ValueError(f"rank {rank} is outside a world of {self.size}")

    def replica_of(self, rank: int) -> int:
        return rank - self.ranks(self.group_of(rank))[0]

    def upstream(self, rank: int) -> list[int]:
        """The ranks this rank receives from, in replica order (empty for the source group)."""
        g = self.group_of(rank)
        return self.ranks(g - 1) if g > 0 else []

    def downstream(self, rank: int) -> list[int]:
        g = self.group_of(rank)
        return self.ranks(g + 1) if g + 1 < len(self.replicas) else []

    def block_replicas(self) -> dict[int, int]:
        """Block index -> the replicas of its group."""
        return {j: r for blocks, r in zip(self.blocks, self.replicas) for j in blocks}


def share(index: int, replicas: int) -> int:
    """The replica of a group with `replicas` ranks that takes batch `index` (of an epoch or an evaluation)."""
    return index % replicas


def next_index(cursor: int, replica: int, replicas: int) -> int:
    """The first batch index >= cursor that `replica` of `replicas` takes."""
    return cursor + (replica - cursor) % replicas


def rows(n: int, replica: int, replicas: int) -> slice:
    """Note [split replicas]: the rows of a batch of `n` that `replica` of `replicas` takes."""
    q, r = divmod(n, replicas)
    start = replica * q + min(replica, r)
    return slice(start, start + q + (replica < r))


def batches_per_epoch(steps: int, replicas: int, split: bool) -> int:
    """The training batches a replica takes of an epoch of `steps` source batches (sync): every one
    with split replicas (Note [split replicas]), else every R-th, rounded up."""
    return steps if split else -(-steps // replicas)


def split_sources(replica: int, up: int, down: int) -> list[int]:
    """Note [split replicas]: the upstream replicas (of `up`) whose rows replica `replica` (of `down`)
    joins, in row order."""
    return list(range(up)) if down == 1 else [0] if up == 1 else [replica]


def split_route(n: int, replica: int, up: int, down: int) -> list[tuple[int, slice]]:
    """Note [split replicas]: (downstream replica, rows of this replica's `n` outputs) for each one it sends to."""
    if up == 1 and down > 1:
        return [(j, rows(n, j, down)) for j in range(down)]
    return [(0 if down == 1 else replica, slice(0, n))]


def split_tensors(tensors, replica: int, replicas: int):
    """This replica's rows of each tensor of a batch (None stays None)."""
    if not tensors:
        return tensors
    n = next(t for t in tensors if t is not None).shape[0]
    part = rows(n, replica, replicas)
    return [None if t is None else t[part] for t in tensors]


def join_tensors(parts: list[list]) -> list:
    """The pieces' rows in order, per tensor (None when the pieces hold none)."""
    return [None if ts[0] is None else ts[0] if len(ts) == 1 else torch.cat(ts) for ts in zip(*parts)]
