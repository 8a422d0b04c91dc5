"""Named, explicit random streams.

Every random choice (data order, augmentation, a block's initialisation, a block's dropout) draws
from a stream derived from the job seed and a name, so a block's randomness does not depend on which
process owns it or on what the other blocks did. That is what lets the distributed engine reproduce
the single-process trainer bit for bit.
"""
from __future__ import annotations

import hashlib

import torch

from .device import accel


def derive_seed(seed: int, *names) -> int:
    digest = hashlib.sha256(repr((int(seed),) + names).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, *names) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *names))


class RngState:
    """A private copy of torch's global RNG for one stage (dropout and friends use the global one).

    `with state:` swaps it in for the duration of the block's work and saves it back after.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device, self.dev = device, accel(device)
        with torch.random.fork_rng(devices=self.dev.rng_devices()):
            torch.manual_seed(seed)
            self.cpu = torch.get_rng_state()
            self.cuda = self.dev.get_rng_state()  # the device's generator (None: the host has none apart)
        self._saved = None

    def __enter__(self):
        self._saved = (torch.get_rng_state(), self.dev.get_rng_state() if self.cuda is not None else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            self.dev.set_rng_state(self.cuda)
        return self

    def __exit__(self, *exc):
        self.cpu = torch.get_rng_state()
        torch.set_rng_state(self._saved[0])
        if self.cuda is not None:
            self.cuda = self.dev.get_rng_state()
            self.dev.set_rng_state(self._saved[1])
        return False

    def state_dict(self) -> dict:
        return {"cpu": self.cpu, "cuda": self.cuda}

    def load_state_dict(self, sd: dict) -> None:
        # uint8 tensors; torch.(cuda.)set_rng_state takes host tensors whatever map_location loaded them to
        self.cpu, self.cuda = sd["cpu"].cpu(), sd["cuda"].cpu() if sd["cuda"] is not None else None
