"""The wire format (transport.py, note [one transfer per message]): a message packs into one byte
buffer that the receiver cuts back into the same tensors, and two ranks that track the next
transfer's size stay in step through size changes, markers, announcements and evaluation batches."""
import subprocess
import sys
import textwrap

import pytest
import torch

from decoupled.engine.ranks.transport import HEADER_BYTES, Kind, Message, header_meta, pack, unpack

from torchrun_utils import REPO, env

CPU = torch.device("cpu")


def _same(a: Message, b: Message) -> None:
    assert (a.kind, a.epoch, a.step) == (b.kind, b.epoch, b.step)
    for name in ("x", "y", "ids", "aux"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert v.dtype == (torch.int64 if name in ("y", "ids") else u.dtype) and torch.equal(u.to(v.dtype), v), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,dims,aux", [(64, [150], 0), (3, [3], 10), (1, [2, 3, 5], 0), (7, [1, 3, 3], 3)])
def test_pack_then_unpack_gives_the_message_back(dtype, n, dims, aux):
    """Odd byte counts (3 x 3 bfloat16 = 18 bytes) are padded so every segment stays aligned."""
    m = Message(Kind.EVAL if aux else Kind.TRAIN, 2, 17, torch.randn(n, *dims).to(dtype),
                torch.randint(10, (n,), dtype=torch.int32), torch.arange(n), torch.randn(n, aux) if aux else None)
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
    marker = Message(Kind.END_EPOCH, 4)
    meta = header_meta(marker, 64)
    assert meta[12] == HEADER_BYTES
    buf, _ = pack(marker, meta, 4096, CPU)
    _same(marker, unpack(buf, buf[:HEADER_BYTES].view(torch.int64).tolist()))


SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from decoupled.engine.ranks.transport import Kind, Link, Message
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    link = Link(dist.new_group([0, 1]), 1 - rank, torch.device("cpu"), 60.0, 1000)
    g = torch.Generator().manual_seed(0)
    def batch(kind, epoch, step, n, dims=(800,), dtype=torch.float32, aux=0):
        return Message(kind, epoch, step, torch.randn(n, *dims, generator=g).to(dtype),
                       torch.randint(10, (n,), generator=g), torch.arange(n),
                       torch.randn(n, aux, generator=g) if aux else None)
    msgs = [batch(Kind.TRAIN, 0, i, 64) for i in range(4)]   # the first is announced, the rest one transfer each
    msgs += [batch(Kind.TRAIN, 0, 4, 17), Message(Kind.END_EPOCH, 0)]   # a smaller last batch, a padded marker
    msgs += [batch(Kind.EVAL, 0, 0, 1000, (3, 3), torch.bfloat16, 10),
             batch(Kind.EVAL, 0, 1, 7, (3, 3), torch.bfloat16, 10)]
    msgs += [Message(Kind.END_EVAL, 0), batch(Kind.TRAIN, 1, 5, 64), Message(Kind.STOP, 1)]
    if rank == 0:
        for m in msgs:
            link.send(m)
        link.flush()
    else:
        for m in msgs:
            got = link.recv()
            assert (got.kind, got.epoch, got.step) == (m.kind, m.epoch, m.step), (got.kind, m.kind)
            for name in ("x", "y", "ids", "aux"):
                u, v = getattr(m, name), getattr(got, name)
                assert (u is None) == (v is None) and (u is None or torch.equal(u.to(v.dtype), v)), name
    # one file per rank: torchrun's ranks share one stdout, and with PYTHONUNBUFFERED a print is two
    # writes (text, then newline) that the other rank's print can split into one line
    with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:
        f.write(f"{link.messages} messages {link.bytes} bytes")
    dist.destroy_process_group()
""")


def test_two_ranks_stay_in_step_through_every_kind_of_message(tmp_path):
    script = tmp_path / "link.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(tmp_path)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sent, got = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert sent == got  # both ends counted the same bytes on the wire, padding and announcements included
