"""The wire format (transport.py, note [one transfer per message]): a message packs into one byte
buffer that the receiver cuts back into the same tensors, and two ranks that track the next
transfer's size stay in step through size changes, markers, announcements and evaluation batches."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from decoupled.device import accel
from decoupled.engine.ranks.transport import HEADER_BYTES, Kind, Message, header_meta, pack, unpack

from torchrun_utils import REPO, env

CPU = accel(torch.device("cpu"))


def _same(a: Message, b: Message) -> None:
    assert (a.kind, a.epoch, a.step, a.frozen) == (b.kind, b.epoch, b.step, b.frozen)
    for name in ("x", "y", "ids", "aux"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert v.dtype == (torch.int64 if name in ("y", "ids") else u.dtype) and torch.equal(u.to(v.dtype), v), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,dims,aux", [(64, [150], 0), (3, [3], 10), (1, [2, 3, 5], 0), (7, [1, 3, 3], 3)])
def test_pack_then_unpack_gives_the_message_back(dtype, n, dims, aux):
    """Odd byte counts (3 x 3 bfloat16 = 18 bytes) are padded so every segment stays aligned; the frozen
    bit (header slot 13) comes back as it went, set or not."""
    m = Message(Kind.EVAL if aux else Kind.TRAIN, 2, 17, torch.randn(n, *dims).to(dtype),
                torch.randint(10, (n,), dtype=torch.int32), torch.arange(n), torch.randn(n, aux) if aux else None,
                frozen=n % 2 == 1)
    meta = header_meta(m, 64)
    buf, _ = pack(m, meta, meta[12], CPU)
    assert len(buf) == meta[12] and meta[12] % 8 == 0
    _same(m, unpack(buf, buf[:HEADER_BYTES].view(torch.int64).tolist()))


def test_a_message_packs_into_a_larger_transfer():
    """A message smaller than the transfer the receiver posted rides in it (the tail is padding)."""
    m = Message(Kind.TRAIN, 0, 3, torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), torch.arange(5))
    meta = header_meta(m, 64)
    buf, _ = pack(m, meta, meta[12] + 1000, CPU)
    assert len(buf) == meta[12] + 1000
    _same(m, unpack(buf, buf[:HEADER_BYTES].view(torch.int64).tolist()))
    marker = Message(Kind.END_EPOCH, 4, frozen=True)
    meta = header_meta(marker, 64)
    assert meta[12] == HEADER_BYTES
    buf, _ = pack(marker, meta, 4096, CPU)
    _same(marker, unpack(buf, buf[:HEADER_BYTES].view(torch.int64).tolist()))


ROUTED = [64, 17, 64, 64, 3, 40, 40]  # QuickNet-style re-batching: each batch the samples routed on

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from decoupled.engine.ranks.transport import Kind, Link, Message, header_meta
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    link = Link(dist.new_group([0, 1]), 1 - rank, torch.device("cpu"), 60.0, 1000)
    g = torch.Generator().manual_seed(0)
    def batch(kind, epoch, step, n, dims=(800,), dtype=torch.float32, aux=0, frozen=False, ids=None):
        return Message(kind, epoch, step, torch.randn(n, *dims, generator=g).to(dtype),
                       torch.randint(10, (n,), generator=g), torch.arange(n) if ids is None else ids,
                       torch.randn(n, aux, generator=g) if aux else None, frozen=frozen)
    msgs = [batch(Kind.TRAIN, 0, i, 64, frozen=i % 2 == 1) for i in range(4)]   # 0-3: steady state
    msgs += [batch(Kind.TRAIN, 0, 4, 17), Message(Kind.END_EPOCH, 0)]   # 4, 5: a smaller last batch, a marker
    msgs += [batch(Kind.EVAL, 0, 0, 1000, (3, 3), torch.bfloat16, 10),   # 6, 7: evaluation, with aux
             batch(Kind.EVAL, 0, 1, 7, (3, 3), torch.bfloat16, 10)]
    msgs += [Message(Kind.END_EVAL, 0), batch(Kind.TRAIN, 1, 5, 64)]   # 8, 9
    for i, n in enumerate(sys.argv[2].split(",")):   # 10-16: routed batches, their ids a subset of the source's
        msgs.append(batch(Kind.TRAIN, 1, 6 + i, int(n), frozen=i == 2,
                          ids=torch.randperm(5000, generator=g)[:int(n)]))
    msgs.append(Message(Kind.STOP, 1, frozen=True))   # 17: the bit rides on a marker too
    per = []  # per message, as this end counted it: transfers, bytes, the frozen bit, `expect` after it
    for m in msgs:
        t, b = link.transfers, link.bytes
        if rank == 0:
            link.send(m)
            got = m
        else:
            got = link.recv()
            assert (got.kind, got.epoch, got.step) == (m.kind, m.epoch, m.step), (got.kind, m.kind)
            for name in ("x", "y", "ids", "aux"):
                u, v = getattr(m, name), getattr(got, name)
                assert (u is None) == (v is None) and (u is None or torch.equal(u.to(v.dtype), v)), name
        per.append([link.transfers - t, link.bytes - b, got.frozen, link.expect])
    if rank == 0:
        link.flush()
    # one file per rank: torchrun's ranks share one stdout, and with PYTHONUNBUFFERED a print is two
    # writes (text, then newline) that the other rank's print can split into one line
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump({"messages": link.messages, "bytes": link.bytes, "transfers": link.transfers, "per": per,
                   "sizes": [header_meta(m, 1000)[12] for m in msgs], "data": [m.x is not None for m in msgs]}, f)
    dist.destroy_process_group()
""")

# Transfers per message (transport.py, note [one transfer per message]). Both ends track `expect`, the
# size of the link's last data message (a header's at first): a message that fits goes as one transfer
# of `expect` bytes; a larger one as an announcement (`expect` bytes) and then itself (2 transfers).
# Sender: 1, or 2 when announced. Receiver: the irecvs it posts while handling the message: the
# announced size's (when announced) and the one it posts ahead for the next message (none after
# STOP); the very first message also pays for the first irecv, posted by that recv() itself.
#        (sender, receiver) for message:
FLOW = [(2, 3),  # 0  64 samples: the first data message, larger than a header: announced
        (1, 1), (1, 1), (1, 1),  # 1-3  64 each: steady state, one transfer each
        (1, 1),  # 4  17: fits in the 64-sample transfer (padded); `expect` shrinks to its size
        (1, 1),  # 5  END_EPOCH: a header, padded to the 17-sample size; `expect` unchanged
        (2, 2),  # 6  1000 eval samples of 3x3 bfloat16 + aux: larger than 17 x 800 float32, announced
        (1, 1),  # 7  7 eval samples: fits
        (1, 1),  # 8  END_EVAL
        (2, 2),  # 9  64 training samples after 7 eval ones: announced
        (1, 1),  # 10 routed 64: the same size again, one transfer
        (1, 1),  # 11 routed 17: fits, padded
        (2, 2),  # 12 routed 64 after 17: announced (and frozen: the bit rides in the announced header)
        (1, 1),  # 13 routed 64: one transfer again
        (1, 1),  # 14 routed 3: fits, padded
        (2, 2),  # 15 routed 40 after 3: announced
        (1, 1),  # 16 routed 40: one transfer
        (1, 0)]  # 17 STOP: the receiver posts nothing after it
FROZEN = [i in (1, 3, 12, 17) for i in range(len(FLOW))]


def test_two_ranks_stay_in_step_through_every_kind_of_message(tmp_path):
    script = tmp_path / "link.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(tmp_path), ",".join(map(str, ROUTED))]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]  # rank 1 got every message whole
    sent, got = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert sent["messages"] == got["messages"] == len(FLOW)
    assert sent["bytes"] == got["bytes"]  # both ends counted the same bytes, padding and announcements included
    # transfers: each end's count per message, as derived above
    assert [p[0] for p in sent["per"]] == [s for s, _ in FLOW]
    assert [p[0] for p in got["per"]] == [r for _, r in FLOW]
    assert sum(s for s, _ in FLOW[1:6]) == 5  # steady state: as many transfers as messages
    # the receiver runs one irecv ahead: after message k (not STOP) it has posted one more than the sender
    # sent; after STOP both ends have issued the same point-to-point calls (18 messages + 5 announcements)
    for k in range(len(FLOW) - 1):
        assert sum(p[0] for p in got["per"][:k + 1]) == sum(p[0] for p in sent["per"][:k + 1]) + 1, k
    assert sent["transfers"] == got["transfers"] == len(FLOW) + 5
    # bytes per message from the protocol: `expect` bytes, plus the message's own size when announced
    expect, want = HEADER_BYTES, []
    for size, data in zip(sent["sizes"], sent["data"]):
        want.append(expect + (size if size > expect else 0))
        expect = size if data else expect
    assert [p[1] for p in sent["per"]] == [p[1] for p in got["per"]] == want
    assert [p[3] for p in sent["per"]] == [p[3] for p in got["per"]]  # both ends agree on `expect` throughout
    # header slot 13: frozen arrives frozen, and not frozen stays not frozen
    assert [p[2] for p in sent["per"]] == [p[2] for p in got["per"]] == FROZEN
