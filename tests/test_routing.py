"""Re-batching of routed samples: every sample delivered exactly once per epoch, in order."""
import torch

from decoupled.engine.routing import Rebatcher


def test_rebatcher_delivers_every_sample_once_in_order():
    g = torch.Generator().manual_seed(0)
    rb = Rebatcher(batch_size=8)
    sent, got = [], []
    next_id = 0
    for _ in range(20):  # routed sub-batches of random sizes, some empty
        n = int(torch.randint(0, 7, (1,), generator=g))
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        sent.append(ids)
        rb.add(ids.float().unsqueeze(1), ids % 10, ids)
        for x, y, i in rb.full():
            assert len(i) == 8 and torch.equal(x[:, 0].long(), i) and torch.equal(y, i % 10)
            got.append(i)
    tail = list(rb.flush())
    assert all(len(i) <= 8 for _, _, i in tail)
    got += [i for _, _, i in tail]
    assert torch.equal(torch.cat(got), torch.cat(sent))
    assert rb.count == 0 and list(rb.flush()) == []
