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
"""
from __future__ import annotations

from dataclasses import dataclass


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
