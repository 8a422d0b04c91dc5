"""Workers of `decoupled bench --guard` (guard.py), each a fresh process that writes one figure.

    python -m decoupled.bench.guard_worker e2e OUT.json      e2e mode vs a plain PyTorch loop
    torchrun --nproc-per-node 2 -m decoupled.bench.guard_worker recv OUT.json   Link vs bare p2p
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..job import load
from .guard import TIMED, VGG
from .runner import median, read_jsonl, timed


E2E_ROUNDS = 8  # alternated rounds of e2e_overhead (4 gave a spread of +-15 % across invocations)


def e2e_overhead(out: str) -> None:
    """The e2e trainer's epoch over a plain loop's, alternated E2E_ROUNDS times in this one process
    (the same network, batches of the same size, SGD with the same settings, no augmentation, no
    evaluation); the fastest epoch of each."""
    from ..data import build_data
    from ..trainers.e2e import E2E
    from ..engine.run import Run
    from ..engine.build import build_stages
    from ..metrics import Recorder
    cfg = load(None, [*VGG, "train.mode=e2e", "train.probe_epochs=0", f"train.epochs={1 + TIMED}", "data.augment=none"])
    data = build_data(cfg.data, cfg.train.seed)
    steps = -(-len(data.train) // cfg.data.batch_size)
    cfg = load(None, [f"train.log_every={steps}"], base=cfg)  # one `step` stamp per epoch
    cpu = torch.device("cpu")
    e2e, plain = [], []
    for r in range(E2E_ROUNDS):  # alternated, the order flipped every round: a drift in machine speed cancels
        for which in (("e2e", "plain") if r % 2 == 0 else ("plain", "e2e")):
            if which == "plain":
                plain += plain_loop(cfg, data, build_stages)
                continue
            torch.manual_seed(cfg.train.seed)
            with tempfile.TemporaryDirectory() as d:
                stages = build_stages(cfg, data.input_shape, data.num_classes, cpu)
                run = Run(cfg, data, stages, cpu, Path(d), Recorder(Path(d) / "metrics.jsonl"))
                E2E(cfg).train(run)
                run.recorder.close()
                stamps = [m["time_s"] for m in read_jsonl(Path(d) / "metrics.jsonl") if m.get("kind") == "step"]
            e2e += timed(stamps[:1 + TIMED])  # stamps[0] closes the warm-up epoch
    # the fastest epoch of each: other load on the machine only ever adds time
    ratio = min(e2e) / min(plain)
    Path(out).write_text(json.dumps({"value": ratio, "detail": f"e2e {min(e2e):.3f} s/epoch, plain loop "
                                     f"{min(plain):.3f} s/epoch (fastest of {len(e2e)} epochs each; medians "
                                     f"{median(e2e):.3f} / {median(plain):.3f})"}))


def plain_loop(cfg, data, build_stages) -> list[float]:
    """What a user would write: the blocks and the last head as one nn.Sequential, torch.optim.SGD."""
    torch.manual_seed(cfg.train.seed)
    stages = build_stages(cfg, data.input_shape, data.num_classes, torch.device("cpu"))
    net = torch.nn.Sequential(*[m for s in stages for m in (s.block, s.outlet)], stages[-1].objective.head).train()
    o = cfg.optim
    opt = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    x, y, B = data.train.x, data.train.y, cfg.data.batch_size
    g = torch.Generator().manual_seed(cfg.train.seed)
    times = []
    for _ in range(1 + TIMED):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), B):
            idx = perm[i:i + B]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def recv_cost(out: str, messages: int = 1000, rounds: int = 8) -> None:
    """Per message: a Link (one transfer, its receiver's next irecv posted ahead) against the old
    three-transfer format on bare isend/irecv (header, labels and ids, activations: three transfers a
    message, each received in turn; two messages in flight), alternated in this one invocation: the
    ratio of their fastest rounds. A Link that went back to three transfers would cost the three
    rendezvous plus its Python, more than the bare three (a ratio above 1)."""
    import torch.distributed as dist

    from ..engine.ranks.transport import HEADER_BYTES, Kind, Link, Message
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group, raw_group = dist.new_group([0, 1]), dist.new_group([0, 1])  # the Link keeps an irecv posted
    n, width = 64, 16
    m = Message(Kind.TRAIN, 0, 0, torch.randn(n, width), torch.zeros(n, dtype=torch.int64), torch.arange(n))
    sizes = [HEADER_BYTES, 2 * n * 8, n * width * 4]  # the old format's three transfers
    link = Link(group, 1 - rank, torch.device("cpu"), 60.0, n)

    def link_loop():
        for _ in range(messages):
            link.send(m) if rank == 0 else link.recv()
        link.flush()

    def three_loop():
        inflight = []
        for _ in range(messages):
            if rank == 0:
                inflight.append([dist.isend(torch.empty(s, dtype=torch.uint8), 1, group=raw_group) for s in sizes])
                while len(inflight) > 2:
                    for w in inflight.pop(0):
                        w.wait()
            else:
                for s in sizes:
                    dist.irecv(torch.empty(s, dtype=torch.uint8), 0, group=raw_group).wait()
        for works in inflight:
            for w in works:
                w.wait()

    result = {"link": float("inf"), "three": float("inf")}
    for name, loop in [("link", link_loop), ("three", three_loop)] * rounds:  # alternated; fastest of each
        dist.barrier(group)
        t0 = time.perf_counter()
        loop()
        dist.barrier(group)
        result[name] = min(result[name], (time.perf_counter() - t0) / messages * 1e6)
    if rank == 0:
        Path(out).write_text(json.dumps({"value": result["link"] / result["three"],
                                         "detail": f"Link {result['link']:.0f} µs/message, the three-transfer "
                                                   f"format on bare p2p {result['three']:.0f} µs ({sum(sizes)} B "
                                                   f"messages; fastest of {rounds} rounds of {messages} each)"}))
    dist.destroy_process_group()


if __name__ == "__main__":
    what, out = sys.argv[1], sys.argv[2]
    {"e2e": e2e_overhead, "recv": recv_cost}[what](out)
