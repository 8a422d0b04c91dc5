"""FLOP accounting: counts of a Linear and a Conv block equal the formula (2 per multiply-add,
backward = weight gradient + input gradient where autograd needs one), and train_flops of the
trainers = samples x per-sample step + counted extra work."""
import torch

from decoupled.job import load
from decoupled.engine.build import build_stages
from decoupled.flops import count_flops, inference_flops, stage_costs, train_flops
from decoupled.run_job import train

CPU = torch.device("cpu")
C = 10  # classes


def test_linear_block_matches_formula():
    cfg = load(None, ["model.widths=[32, 16]", "objective.k=1"])  # k=1 on dense features: one Linear head
    s0, s1 = build_stages(cfg, (1, 8, 8), C, CPU)
    f_in, w0, w1 = 64, 32, 16
    c0 = stage_costs(s0)
    assert c0["forward"] == 2 * f_in * w0
    assert c0["exit"] == 2 * w0 * C
    # local step: block forward + weight grad (its input is detached: no input grad), head forward +
    # weight grad + the grad into the block's output
    assert c0["step"] == 2 * (2 * f_in * w0) + 3 * (2 * w0 * C)
    assert c0["exit_step"] == 2 * (2 * w0 * C)
    c1 = stage_costs(s1)
    # inside e2e backprop block 1 also computes the gradient of its input; the loss head's piece
    # (charged to the last block) is forward + weight grad + grad into the block's output
    assert c1["e2e_step"] == 3 * (2 * w0 * w1) and c1["e2e_head"] == 3 * (2 * w1 * C)
    assert c0["e2e_step"] == 2 * (2 * f_in * w0)  # the first block: no input grad
    # the raw counter agrees on a plain Linear
    lin = torch.nn.Linear(5, 7)
    assert count_flops(lambda: lin(torch.randn(3, 5))) == 2 * 3 * 5 * 7


def test_conv_block_matches_formula():
    cfg = load(None, ["model.name=vgg", "model.hierarchy=[1, 1]", "model.width=4", "objective.name=quicknet",
                      "train.mode=quicknet"])
    s0, s1 = build_stages(cfg, (3, 8, 8), C, CPU)
    conv0 = 2 * 3 * 4 * 9 * 8 * 8  # 3->4 channels, 3x3, on 8x8 (padding 1), per sample
    conv1 = 2 * 4 * 8 * 9 * 4 * 4  # 4->8 on 4x4 after the first stage's pool
    assert stage_costs(s0)["forward"] == conv0 and stage_costs(s1)["forward"] == conv1
    head0 = 2 * (4 * 4 * 4) * C  # mixed pooling keeps 4x4: linear 64 -> 10
    commit0 = 2 * (64 * C + C * 1)  # commitment: 64 -> C -> 1
    c0 = stage_costs(s0)
    assert c0["exit"] == head0 and c0["commit"] == commit0
    assert c0["step"] == 2 * conv0 + 3 * head0
    c1 = stage_costs(s1)
    assert c1["e2e_step"] + c1["e2e_head"] == 3 * conv1 + 3 * (2 * (8 * 2 * 2) * C)  # 2x2 maps: not pooled
    # inference: blocks + exits + commitment heads up to each exit
    assert inference_flops([s0, s1], [True, False]) == [conv0 + head0 + commit0,
                                                       conv0 + head0 + commit0 + conv1 + 2 * 32 * C]


def test_counting_leaves_the_stage_untouched():
    cfg = load(None, ["model.widths=[8, 8]", "model.dropout=0.5"])
    s = build_stages(cfg, (1, 8, 8), C, CPU)[0]
    before = {k: v.clone() for k, v in s.block.state_dict().items()}
    rng = torch.get_rng_state()
    stage_costs(s)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in s.block.state_dict().items())
    assert all(p.grad is None for p in s.parameters())


def test_e2e_pieces_add_up_to_the_whole_network():
    cfg = load(None, ["model.widths=[16, 12, 8]", "train.mode=e2e"])
    stages = build_stages(cfg, (1, 8, 8), C, CPU)
    net = torch.nn.Sequential(*[s.block for s in stages])
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, C, (4,))
    whole = count_flops(lambda: stages[-1].objective(net(x), y).loss.backward()) / 4
    assert sum(stage_costs(s, batch=4)["e2e_step"] for s in stages) + stage_costs(stages[-1], 4)["e2e_head"] == whole


SMALL = ["data.limit_train=200", "data.batch_size=50", "model.widths=[16, 16, 16]", "train.epochs=1",
         "train.checkpoint=false", "train.eval_every=0"]


def test_train_flops_of_the_trainers(tmp_path):
    n = 200
    for mode in ("e2e", "sequential", "simultaneous"):
        summary = train(load(None, SMALL + [f"train.mode={mode}"]), tmp_path / mode)
        stages = build_stages(load(None, SMALL + [f"train.mode={mode}"]), (1, 8, 8), C, CPU)
        costs = [stage_costs(s, batch=50) for s in stages]
        if mode == "e2e":  # every block's e2e piece for every sample, then 1 probe epoch per intermediate head
            expect = [n * c["e2e_step"] for c in costs]
            expect[2] += n * costs[2]["e2e_head"]
            for j in (0, 1):
                expect[j] += n * costs[j]["exit_step"]
                for i in range(j + 1):
                    expect[i] += n * costs[i]["forward"]
        else:  # one local step per sample; sequential also caches blocks 0 and 1's outputs once
            expect = [n * c["step"] for c in costs]
            if mode == "sequential":
                expect[0] += n * costs[0]["forward"]
                expect[1] += n * costs[1]["forward"]
        assert [layer["train_flops"] for layer in summary["layers"]] == expect, mode
        assert summary["train_flops"] == sum(expect)
        assert [layer["inference_flops"] for layer in summary["layers"]] == inference_flops(stages, [False] * 3)


def test_train_flops_counts_work():
    cfg = load(None, ["model.widths=[8, 8]"])
    stages = build_stages(cfg, (1, 8, 8), C, CPU)
    stages[0].stats.samples, stages[1].stats.samples = 10, 4
    stages[1].stats.work.update(forward=3, exit=2)
    c = [stage_costs(s) for s in stages]
    assert train_flops(stages, False, 2) == [10 * c[0]["step"], 4 * c[1]["step"] + 3 * c[1]["forward"]
                                                    + 2 * c[1]["exit"]]
