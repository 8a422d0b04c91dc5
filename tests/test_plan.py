"""`decoupled plan` and the cost model it shares with dist.placement = "auto" (decoupled/plan/): the
link-aware cut on constructed costs, bytes per sample exactly, memory against a real run's exact
memory, plan.json's schema, bad input, and the join with bench.json. Deterministic: no timing is
asserted (the times a plan predicts are checked against measured runs on a dated page, not here)."""
import dataclasses
import json
import math

import pytest
import torch

from decoupled.config import ConfigError
from decoupled.engine.ranks.placement import BlockCosts, best_layout, layout
from decoupled.engine.ranks.transport import HEADER_BYTES, Kind, Message, header_meta, message_bytes
from decoupled.engine.wire import CODECS
from decoupled.job import load
from decoupled.plan.cli import main as plan_main, parse_argv, parse_rate
from decoupled.plan.host import HostFit, fit_line
from decoupled.plan.methods import Cluster, HostCosts, Profile, Settings, on_device, powersgd_bytes, predict
from decoupled.plan.model import best_split
from torchrun_utils import check, summary, torchrun

# what host.measure_host returns, without its two processes (tests/test_plan.py's own plans are quick);
# test_host_measurement runs the real one
FAKE_HOST = {"allreduce": HostFit(1e-4, 1e-9), "send": HostFit(2e-4, 3e-10), "recv": HostFit(1e-4, 2e-10),
             "points": {"send": [], "recv": []}}


@pytest.fixture(autouse=True)
def _fake_host(monkeypatch, request):
    if request.node.originalname != "test_host_measurement":
        monkeypatch.setattr("decoupled.plan.measure_job.measure_host", lambda: FAKE_HOST)

B = 64
WIDTHS = [64, 4, 64, 64, 64, 64]  # an MLP whose cut after block 1 is 16x cheaper than any other


def _cut_bytes(widths, codec="float32") -> list[float]:
    return [float(message_bytes(B, CODECS[codec].row_bytes(w))) for w in widths]


def test_link_aware_placement_picks_the_cheaper_cut():
    """Two units per stage or more; equal compute, so without a link the even split wins ([3, 3], a
    64-wide cut); over a slow link each stage is as slow as its send, and the cut moves to the 4-wide
    output of block 1 ([2, 4]: 2 ms compute against 1 ms for the big cut's send alone)."""
    costs = BlockCosts([1e-3] * 6, [0.0] * 6, [0.0] * 6, out_bytes=_cut_bytes(WIDTHS))
    assert best_split(costs.step_s, 2) == [3, 3]
    d = load(None, ["train.mode=sync", "dist.placement=auto"]).dist
    assert layout(d, 6, 2, costs).blocks == [[0, 1, 2], [3, 4, 5]]
    # 10 Mbit/s: the 64-wide cut's 17.5 kB take 14 ms a batch, the 4-wide one's 2.1 kB 1.7 ms
    slow = dataclasses.replace(d, link_mbps=10.0)
    assert layout(slow, 6, 2, costs).blocks == [[0, 1], [2, 3, 4, 5]]
    # a fast link changes nothing; no link is exactly the compute-only model
    fast = dataclasses.replace(d, link_mbps=1e6)
    assert layout(fast, 6, 2, costs).blocks == layout(d, 6, 2, costs).blocks
    for g in ([0, 1], [2, 3, 4], [5]):
        assert costs.stage_s(g, 1) == costs.group_s(g, 1)
    # at 20 Mbit/s the float32 big cut still costs 7 ms, the int8 wire's (5.5 kB) 2.2 ms: under the 3 ms of
    # compute of the balanced split, which wins again
    twenty = dataclasses.replace(d, link_mbps=20.0)
    assert layout(twenty, 6, 2, costs).blocks == [[0, 1], [2, 3, 4, 5]]
    int8 = dataclasses.replace(costs, out_bytes=_cut_bytes(WIDTHS, "int8"))
    assert layout(twenty, 6, 2, int8).blocks == [[0, 1, 2], [3, 4, 5]]


def test_link_aware_placement_on_a_built_network():
    """The cut bytes of a real network (an MLP cut into 6 blocks, its shapes from the model builder) and
    the placement's own measurement path: the slow link moves the cut to block 1's narrow output."""
    from decoupled.engine.build import build_stages
    cfg = load(None, [f"model.widths={WIDTHS}", "train.mode=sync", "dist.placement=auto", "dist.link_mbps=10"])
    stages = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"))
    out = [float(message_bytes(B, CODECS["float32"].row_bytes(math.prod(s.out_shape)))) for s in stages]
    assert out == _cut_bytes(WIDTHS)
    # replicas: an all-reduce of 6 MB at 100 MB/s (60 ms) keeps the pipeline
    costs = BlockCosts([1e-3] * 6, [0.0] * 6, [1e6] * 6, comm_s_per_byte=1e-8, out_bytes=out)
    assert layout(cfg.dist, 6, 2, costs).blocks == [[0, 1], [2, 3, 4, 5]]
    auto = dataclasses.replace(cfg.dist, replicas="auto")
    assert layout(auto, 6, 2, costs).blocks == [[0, 1], [2, 3, 4, 5]]
    assert best_layout(dataclasses.replace(costs, link_s_per_byte=8 / 10e6), 6, 2) == ([2, 4], [1, 1])
    with pytest.raises(ConfigError, match="dist.link_mbps.*applies to"):
        load(None, ["train.mode=sync", "dist.link_mbps=10"])  # no "auto": nothing would read it


def test_message_bytes_are_what_the_transport_sends():
    for codec in ("float32", "bfloat16", "int8", "float8_e4m3fn"):
        for n, shape in ((64, (4,)), (7, (3, 5, 5)), (1, (13,))):
            c = CODECS[codec]
            x = c.encode(torch.randn(n, *shape))
            m = Message(Kind.TRAIN, x=x, y=torch.zeros(n, dtype=torch.long), ids=torch.zeros(n, dtype=torch.long))
            assert header_meta(m, 1024)[12] == message_bytes(n, c.row_bytes(math.prod(shape))), (codec, n, shape)


def _profile(widths=(64, 4, 64, 64), params=1000.0) -> Profile:
    n = len(widths)
    mem = {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": params, "activations_bytes": 500.0}
    return Profile(batch=B, local=BlockCosts([1e-3] * n, [3 * params] * n, [params] * n, act=[500.0] * n,
                                             fixed_s=[0.0] * n),
                   local_mem=[dict(mem) for _ in range(n)],
                   row_bytes={k: [c.row_bytes(w) for w in widths] for k, c in CODECS.items()}, numel=list(widths),
                   fwd_s=[4e-4] * n, bwd_s=[6e-4] * n, e2e_fixed_s=[0.0] * n, e2e_act=[400.0] * n,
                   e2e_mem={"params_bytes": n * params, "grads_bytes": n * params, "optimizer_bytes": n * params,
                            "activations_bytes": 400.0 * n, "held_bytes": 0},
                   e2e_params=[params] * n, opt_s=1e-4, matrices=[(w, 16) for w in widths])


def test_bytes_per_sample_exactly():
    """sync's bytes are its messages': header, labels and ids (16 B a sample), the activations in the
    wire's form; ddp's a ring all-reduce's 2 (K-1)/K of the gradient; localsgd's the parameters once
    every H steps; gpipe's float32 activations on and gradients back."""
    p, s = _profile(), Settings(message_bytes, powersgd_rank=2, localsgd_period=8)
    c = Cluster(2, parse_rate("100mbit"))
    sync = predict(p, c, s, "sync")
    assert sync["layout"]["placement"] == [[0, 1], [2, 3]]  # the 4-wide cut: 2 blocks a stage either way
    assert sync["wire_bytes_per_sample"] == (HEADER_BYTES + 16 * B + 4 * 4 * B) / B == 33.75
    int8 = predict(p, c, s, "sync-int8")
    assert int8["wire_bytes_per_sample"] == (HEADER_BYTES + 16 * B + 8 * B) / B  # 4 codes + 4 B scale a row
    k4 = predict(p, Cluster(4, c.link), s, "sync")
    assert k4["wire_bytes_per_sample"] == (3 * (HEADER_BYTES + 16 * B) + 4 * B * (64 + 4 + 64)) / (3 * B)
    assert k4["link_bytes_per_sample"] == (HEADER_BYTES + 16 * B + 4 * B * 64) / B
    ddp = predict(p, Cluster(4, c.link), s, "ddp")
    assert ddp["link_bytes_per_sample"] == 2 * 3 / 4 * 4000 / B
    assert predict(p, Cluster(4, c.link), s, "localsgd")["link_bytes_per_sample"] == 2 * 3 / 4 * 4000 / 8 / B
    assert predict(p, c, s, "gpipe")["link_bytes_per_sample"] == 4 * 4  # the 4-wide cut, one direction each
    assert predict(p, Cluster(2, c.link), s, "fsdp")["link_bytes_per_sample"] == 3 * 1 / 2 * 4000 / B


def test_powersgd_compresses_what_torch_compresses():
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress
    p = dataclasses.replace(_profile(), matrices=[(256, 1), (256, 576), (10, 256), (8, 8)])
    sent, pq = powersgd_bytes(p, 4)
    want = sum(4 * (n + m) * min(n, m, 4) if _should_compress(n, m, min(n, m, 4), 2)[0] else 4 * n * m
               for n, m in p.matrices)
    assert sent == want and pq == 4 * (256 + 576) * 4 + 4 * (10 + 256) * 4


def test_slower_links_never_predict_faster_training():
    p, s = _profile(), Settings(message_bytes)
    for method in ("sync", "async", "ddp", "ddp-powersgd", "localsgd", "fsdp", "gpipe", "1f1b"):
        rates = [predict(p, Cluster(2, parse_rate(r)), s, method)["samples_per_s"]
                 for r in ("1mbit", "100mbit", "10gbit", "loopback")]
        assert rates == sorted(rates), method


TINY = ["--set", "model.widths=[32,8,32,32]", "--set", "data.limit_train=256", "--set", "data.batch_size=32"]


def test_plan_json_schema_and_plot(tmp_path, capsys):
    out = tmp_path / "plan"
    assert plan_main(parse_argv([*TINY, "--ranks", "2,4", "--link", "100mbit,loopback", "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "sync-auto" in text and "plan.json" in text
    res = json.loads((out / "plan.json").read_text())
    methods = ("sync", "sync-int8", "sync-auto", "async", "ddp", "ddp-powersgd", "localsgd", "fsdp", "gpipe", "1f1b")
    assert [(r["method"], r["ranks"], r["link"]) for r in res["rows"]] == \
        [(m, k, link) for link in ("100mbit", "loopback") for k in (2, 4) for m in methods]
    for r in res["rows"]:
        assert r["mode"] == r["method"] and r["samples_per_s"] > 0, r
        assert set(r["layout"]) == {"placement", "replicas", "microbatches"}
        assert sum(r["layout"]["replicas"]) == r["ranks"]
        assert sorted(j for g in r["layout"]["placement"] for j in g) == [0, 1, 2, 3]
        parts = r["exact_mem"]
        total = sum(v for k, v in parts.items() if k != "total_bytes")
        assert r["exact_train_mem_bytes"] == parts["total_bytes"] == total
        assert {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "held_bytes"} <= set(parts)
        assert r["link_bytes_per_s"] == (12.5e6 if r["link"] == "100mbit" else None)
    assert {r["ranks"] for r in res["sweep"]} == {2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64}
    big = [r for r in res["sweep"] if r["ranks"] == 64 and r["method"] == "sync"][0]
    assert big["samples_per_s"] is None and "64 ranks > 4 blocks" in big["error"]
    assert (out / "plan.png").stat().st_size > 0
    assert res["measured"]["batch"] == 32 and res["profile"]["step_s"] and res["assumptions"]
    # the host terms' constants, frozen with the plan: the measured communication, codecs, PowerSGD
    k = res["constants"]
    assert k["backend"].startswith("gloo")
    assert (k["allreduce_host"]["fixed_s"], k["allreduce_host"]["s_per_byte"]) == (1e-4, 1e-9)
    assert (k["send_host"]["fixed_s"], k["recv_host"]["s_per_byte"]) == (2e-4, 2e-10)
    assert set(k["codec"]) == {"float32", "int8"} and len(k["codec"]["int8"]["encode_s"]) == 4
    assert k["powersgd_s"] > 0 and k["powersgd_rank"] == 4
    ddp = [r for r in res["rows"] if r["method"] == "ddp"][0]
    assert ddp["terms"]["host_s"] > 0


def test_plan_from_flops_is_deterministic(tmp_path):
    """--device-tflops: times from FLOPs, so the same plan twice is the same, and a slow link moves
    sync's cut to the narrow output."""
    args = [*TINY, "--ranks", "2", "--link", "1mbit", "--device-tflops", "100", "--methods", "sync,ddp"]
    runs = []
    for i in range(2):
        assert plan_main(parse_argv([*args, "--out", str(tmp_path / str(i))])) == 0
        runs.append(json.loads((tmp_path / str(i) / "plan.json").read_text())["rows"])
    assert [r["samples_per_s"] for r in runs[0]] == [r["samples_per_s"] for r in runs[1]]
    assert runs[0][0]["layout"]["placement"] == [[0, 1], [2, 3]]
    # NCCL on a device planned from FLOPs: no host collective term, and plan.json says so
    res = json.loads((tmp_path / "0" / "plan.json").read_text())
    assert res["constants"]["backend"].startswith("nccl")
    assert res["constants"]["allreduce_host"]["fixed_s"] == res["constants"]["allreduce_host"]["s_per_byte"] == 0
    assert res["constants"]["send_host"]["s_per_byte"] == 0 and res["constants"]["send_host"]["fixed_s"] > 0
    assert any("host" in n and "NCCL" in n for n in res["notes"])
    assert runs[0][1]["terms"]["host_s"] == 0.0


def test_host_terms_zero_and_a_failed_measurement(tmp_path, capsys, monkeypatch):
    """--host-terms zero: no measurement, the host constants 0 and the notes say so; a measurement
    that fails is one line naming the option."""
    out = tmp_path / "z"
    assert plan_main(parse_argv([*TINY, "--ranks", "2", "--link", "1gbit", "--methods", "ddp", "--host-terms", "zero",
                                 "--out", str(out)])) == 0
    res = json.loads((out / "plan.json").read_text())
    assert res["constants"]["allreduce_host"]["s_per_byte"] == 0 and res["rows"][0]["terms"]["host_s"] == 0
    assert any("--host-terms zero" in n for n in res["notes"])

    def fails():
        raise RuntimeError("the two gloo processes failed (exit codes [1])")
    monkeypatch.setattr("decoupled.plan.measure_job.measure_host", fails)
    assert plan_main(parse_argv([*TINY, "--ranks", "2", "--link", "1gbit", "--out", str(tmp_path / "f")])) == 2
    err = capsys.readouterr().err.strip()
    assert "--host-terms" in err and "exit codes" in err and len(err.splitlines()) == 1


def test_ranks_per_node(tmp_path):
    """--ranks-per-node G: K / G nodes at every K, the sweep's too; ranks of a node reach each other at
    --intra-link, so DDP over 2 nodes of 2 is as fast as over the slow link alone allows."""
    out = tmp_path / "p"
    assert plan_main(parse_argv([*TINY, "--ranks", "4", "--link", "1mbit", "--ranks-per-node", "2", "--intra-link",
                                 "100gbit", "--device-tflops", "100", "--methods", "ddp", "--out", str(out)])) == 0
    res = json.loads((out / "plan.json").read_text())
    assert res["rows"][0]["nodes"] == 2 and res["ranks_per_node"] == 2
    nodes = {r["ranks"]: r["nodes"] for r in res["sweep"]}
    assert nodes[2] == 1 and nodes[3] == 2 and nodes[64] == 32
    one = [r for r in res["sweep"] if r["ranks"] == 2][0]  # one node: the intra link
    assert one["terms"]["comm_s"] < res["rows"][0]["terms"]["comm_s"]


@pytest.mark.parametrize("argv,names", [
    (["--ranks", "2", "--link", "100 megabits"], "--link '100 megabits'"),
    (["--ranks", "2", "--link", "1gbit", "--intra-link", "fast"], "--intra-link 'fast'"),
    (["--ranks", "two", "--link", "1gbit"], "--ranks 'two'"),
    (["--ranks", "2,8", "--link", "1gbit"], "--ranks 2,8"),
    (["--ranks", "2", "--link", "1gbit", "--methods", "sync,zero"], "--methods"),
    (["--ranks", "2", "--link", "1gbit", "--set", "model.hierarchy=[1]"], "model.hierarchy"),
    (["--ranks", "2", "--link", "1gbit", "--nodes", "1", "--ranks-per-node", "2"], "--ranks-per-node"),
    (["--ranks", "2", "--link", "1gbit", "--set", "train.mode=sync", "--set", "dist.placement=[1,1]"],
     "dist.placement"),
    (["--ranks", "2", "--link", "1gbit", "--microbatches", "2,four"], "--microbatches"),
])
def test_bad_input_is_one_line_naming_the_option(capsys, argv, names):
    assert plan_main(parse_argv([*TINY, *argv])) == 2
    err = capsys.readouterr().err.strip()
    assert names in err and len(err.splitlines()) == 1 and err.startswith("decoupled: plan:"), err


def test_a_model_that_cannot_be_measured_names_the_option(capsys, monkeypatch):
    import decoupled.plan.measure_job as mj

    def fails(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 TB")
    monkeypatch.setattr(mj, "profile", fails)
    assert plan_main(parse_argv([*TINY, "--ranks", "2", "--link", "1gbit"])) == 2
    err = capsys.readouterr().err.strip()
    assert "--measure-batch" in err and "not enough memory" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_plan_memory_and_bytes_match_a_real_sync_run(tmp_path):
    """The plan's exact memory per rank is within 10 % of what a real 2-rank sync run counts
    (memory.ExactMemory, the bench's exact memory; data.eval_batch_size = the batch, as the bench sets
    it), and its bytes are the run's exactly: every message of a full batch, plus the one announcement
    of the first (transport.py: a link starts expecting a header's size)."""
    cfg = ["model.widths=[256,16,256,256]", "data.limit_train=512", "data.batch_size=64", "data.eval_batch_size=64",
           "train.epochs=1", "train.checkpoint=false"]
    sets = [a for c in cfg for a in ("--set", c)]
    assert plan_main(parse_argv([*sets, "--ranks", "2", "--link", "loopback", "--methods", "sync",
                                 "--out", str(tmp_path / "plan")])) == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())["rows"][0]
    place = [len(g) for g in plan["layout"]["placement"]]
    check(torchrun(2, ["--out", str(tmp_path / "run"), *sets, "--set", "train.mode=sync",
                       "--set", f"dist.placement={place}"], timeout=240))
    ranks = summary(tmp_path / "run")["ranks"]
    for r, predicted in zip(ranks, plan["exact_mem_per_rank"]):
        assert predicted == pytest.approx(r["exact_train_mem_bytes"], rel=0.10), (r["exact_mem"], plan["exact_mem"])
    steps = 512 // 64
    assert ranks[0]["train_bytes_sent"] == HEADER_BYTES + steps * plan["wire_bytes_per_sample"] * 64
    assert ranks[0]["train_samples_sent"] == 512


def test_report_joins_plan_and_bench(tmp_path):
    """Hand-made plan.json and bench.json: rows join on (mode, ranks, link), residuals are predicted /
    measured - 1, and `decoupled report` writes the table and plan_vs_bench.json."""
    from decoupled.report import main as report_main
    plan = {"rows": [{"method": "sync", "mode": "sync", "ranks": 2, "link": "1gbit", "link_bytes_per_s": 1.25e8,
                      "samples_per_s": 1200.0, "exact_train_mem_bytes": 2 * 2 ** 20, "wire_bytes_per_sample": 300.0},
                     {"method": "ddp", "mode": "ddp", "ranks": 2, "link": "loopback", "link_bytes_per_s": None,
                      "samples_per_s": 900.0, "exact_train_mem_bytes": 3 * 2 ** 20}]}
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(plan))
    rank = {"rank": 0, "peak_mem_bytes": 1, "exact_train_mem_bytes": 2 ** 21 * 0.8}
    bench = {"ranks": 2, "n_train": 100, "batch_size": 64, "repeats": 1,
             "machine": {"torch": "x", "cpu_count": 2, "loadavg_start": [0.0]},
             "rows": [{"mode": "sync", "link": "1000mbit", "samples_per_s": 1000.0, "wire_bytes_per_sample": 300.0,
                       "ranks": [rank, {**rank, "rank": 1, "exact_train_mem_bytes": 2 ** 21}]},
                      {"mode": "ddp", "samples_per_s": 1000.0,
                       "ranks": [{**rank, "exact_train_mem_bytes": 3 * 2 ** 20}]},
                      {"mode": "async", "samples_per_s": 800.0, "ranks": []}]}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(bench))
    assert report_main([tmp_path / "plan", tmp_path / "bench"], tmp_path / "report") == 0
    joined = json.loads((tmp_path / "report" / "plan_vs_bench.json").read_text())
    assert [(j["mode"], j["link"]) for j in joined] == [("sync", "1gbit"), ("ddp", "loopback")]
    sync, ddp = joined
    assert sync["samples_per_s"]["residual"] == pytest.approx(0.2)
    assert sync["exact_train_mem_bytes"] == {"predicted": 2 ** 21, "measured": 2 ** 21, "residual": 0.0}
    assert sync["wire_bytes_per_sample"]["residual"] == 0.0
    assert ddp["samples_per_s"]["residual"] == pytest.approx(-0.1)
    assert ddp["wire_bytes_per_sample"] == {"predicted": None, "measured": None, "residual": None}
    page = (tmp_path / "report" / "report.md").read_text()
    assert "| sync | 2 | 1gbit | 1200.0 / 1000.0 (+20%) |" in page


@pytest.mark.slow
def test_plan_memory_matches_the_bench_workers(tmp_path):
    """ddp, fsdp and gpipe as the bench's workers run them (their exact memory, memory.ExactMemory) on
    the plan's own layout: each rank within 10 % of the plan's prediction."""
    import subprocess
    import sys
    from decoupled.job import to_toml
    from torchrun_utils import REPO, env
    cfg = ["model.widths=[256,16,256,256]", "data.limit_train=512", "data.batch_size=64", "data.eval_batch_size=64",
           "train.epochs=2", "train.checkpoint=false", "train.eval_every=0"]
    assert plan_main(parse_argv([*[a for c in cfg for a in ("--set", c)], "--ranks", "2", "--link", "loopback",
                                 "--methods", "ddp,fsdp,gpipe", "--out", str(tmp_path / "plan")])) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "plan" / "plan.json").read_text())["rows"]}
    (tmp_path / "cfg.toml").write_text(to_toml(load(None, cfg)))
    gpipe = rows["gpipe"]["layout"]
    for mode, worker, extra in (("ddp", "dataparallel", []), ("fsdp", "dataparallel", []),
                                ("gpipe", "gpipe", [str(gpipe["microbatches"]), "gpipe",
                                                    ",".join(str(len(g)) for g in gpipe["placement"])])):
        out = tmp_path / f"{mode}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", f"decoupled.bench.{worker}", str(tmp_path / "cfg.toml"), str(out), *(extra or [mode])]
        p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        measured = [r["exact_train_mem_bytes"] for r in json.loads(out.read_text())["ranks"]]
        assert rows[mode]["exact_mem_per_rank"] == pytest.approx(measured, rel=0.10), mode


# ---------------------------------------------------------------------------- the host terms (docs/plan.md)

def _with(p: Profile, **host) -> Profile:
    return dataclasses.replace(p, host=dataclasses.replace(p.host, **host))


def _step(p: Profile, method: str, k: int = 2, link: str = "1gbit") -> float:
    return predict(p, Cluster(k, parse_rate(link)), Settings(message_bytes), method)["step_s"]


def _codec(n: int, enc: float, dec: float) -> dict:
    return {"encode_s": [enc] * n, "encode_fixed_s": [0.0] * n, "decode_s": [dec] * n, "decode_fixed_s": [0.0] * n}


# (the term's HostCosts field, its values from zero upwards, the methods it slows, (method, K) it leaves alone)
TERMS = [
    ("allreduce", [(0.0, 0.0), (1e-4, 0.0), (1e-4, 1e-9), (1e-3, 1e-8)],
     [("ddp", 2), ("ddp-powersgd", 2), ("localsgd", 2), ("fsdp", 2), ("sync-auto", 8)], [("sync", 2), ("gpipe", 2)]),
    ("send", [(0.0, 0.0), (1e-4, 0.0), (1e-4, 1e-8), (1e-3, 1e-7)],
     [("sync", 2), ("sync-int8", 2), ("sync-auto", 2), ("async", 2), ("gpipe", 2), ("1f1b", 2)], [("ddp", 2)]),
    ("recv", [(0.0, 0.0), (1e-4, 0.0), (1e-4, 1e-8), (1e-3, 1e-7)],
     [("sync", 2), ("async", 2), ("gpipe", 2), ("1f1b", 2)], [("fsdp", 2)]),
    ("powersgd_s", [0.0, 1e-4, 1e-3, 1e-2], [("ddp-powersgd", 2)], [("ddp", 2), ("sync", 2)]),
    ("codec", [{}, {"int8": _codec(4, 1e-5, 1e-5)}, {"int8": _codec(4, 1e-4, 1e-4)},
               {"int8": _codec(4, 1e-3, 2e-3)}], [("sync-int8", 2)], [("sync", 2), ("ddp", 2)]),
]


@pytest.mark.parametrize("term,values,slowed,untouched", TERMS, ids=[t[0] for t in TERMS])
def test_each_host_term_is_zero_at_zero_and_raises_the_step_time(term, values, slowed, untouched):
    """A term whose constant is 0 predicts exactly what the model without it does; a positive one
    slows the methods it applies to, more as it grows, and leaves the others as they are."""
    p = _profile()
    assert _with(p, **{term: values[0]}) == dataclasses.replace(p, host=HostCosts())
    for method, k in slowed + untouched:
        steps = [_step(_with(p, **{term: v}), method, k) for v in values]
        assert steps[0] == _step(p, method, k), (term, method)
        if (method, k) in untouched:
            assert len(set(steps)) == 1, (term, method, steps)
        else:
            assert steps == sorted(steps) and steps[-1] > steps[0], (term, method, steps)


def test_a_placement_given_is_predicted_as_the_engine_runs_it():
    """dist.placement as a list (the bench's even split, a user's own): the decoupled rows predict that
    layout at its K, so a plan is checked against the run it stands for; at another K the plan searches."""
    p, slow = _profile(), Cluster(2, parse_rate("10mbit"))
    searched = predict(p, slow, Settings(message_bytes), "sync")
    assert searched["layout"]["placement"] == [[0, 1], [2, 3]]  # the 4-wide cut after block 1
    for method in ("sync", "sync-int8", "async"):
        given = predict(p, slow, Settings(message_bytes, placement=(1, 3)), method)
        assert given["layout"]["placement"] == [[0], [1, 2, 3]], method
    assert given["wire_bytes_per_sample"] > searched["wire_bytes_per_sample"]
    assert predict(p, Cluster(3, parse_rate("10mbit")), Settings(message_bytes, placement=(1, 3)),
                   "sync")["layout"]["placement"] != [[0], [1, 2, 3]]


def test_the_pipelines_choose_among_the_microbatch_counts_given():
    """--microbatches (the bench's sweep): the plan picks among those counts only, so it predicts the
    layout a bench row can have run."""
    p = _with(_profile(), send=(1e-4, 0.0), recv=(1e-4, 0.0))
    for method in ("gpipe", "1f1b"):
        free = predict(p, Cluster(2, math.inf), Settings(message_bytes), method)["layout"]["microbatches"]
        given = [m for m in (2, 4, 8) if m != free][:2]
        got = predict(p, Cluster(2, math.inf), Settings(message_bytes, microbatches=tuple(given)), method)
        assert got["layout"]["microbatches"] in given, method


def test_host_terms_on_a_slow_link_still_never_predict_faster_training():
    p = _with(_profile(), allreduce=(1e-4, 1e-9), send=(2e-4, 1e-9), recv=(1e-4, 1e-9), powersgd_s=1e-3)
    for method in ("sync", "async", "ddp", "ddp-powersgd", "localsgd", "fsdp", "gpipe", "1f1b"):
        rates = [predict(p, Cluster(2, parse_rate(r)), Settings(message_bytes), method)["samples_per_s"]
                 for r in ("1mbit", "100mbit", "10gbit", "loopback")]
        assert rates == sorted(rates), method


def test_a_per_message_cost_makes_the_pipeline_take_fewer_microbatches():
    """Without a per-message cost the bubble (K-1)/(M+K-1) shrinks with M, so M = B wins; each
    microbatch's messages cost a fixed host time, so then fewer, larger microbatches win."""
    p = _profile()
    for method in ("gpipe", "1f1b"):
        free = predict(p, Cluster(2, math.inf), Settings(message_bytes), method)
        assert free["layout"]["microbatches"] == B
        paid = predict(_with(p, send=(1e-4, 0.0), recv=(1e-4, 0.0)), Cluster(2, math.inf), Settings(message_bytes),
                       method)
        assert paid["layout"]["microbatches"] < B and paid["step_s"] > free["step_s"]


def test_a_device_from_flops_has_no_host_collective_term():
    """on_device (NCCL): the all-reduce's host term and the transport's per byte are 0, so ddp on an
    unlimited link is its compute alone; a message costs kernel launches."""
    p = _with(_profile(), allreduce=(1e-3, 1e-8), send=(1e-3, 1e-8), recv=(1e-3, 1e-8), powersgd_s=1.0,
              codec={"float32": _codec(4, 0.0, 0.0), "int8": _codec(4, 1.0, 1.0)})
    n = len(p.fwd_s)
    d = on_device(p, [1e6] * n, [3e6] * n, [1e6] * n, [1] * n, 2 * n, 100.0, 0.5, 1e-5)
    assert d.host.allreduce == (0.0, 0.0) and d.host.send[1] == d.host.recv[1] == 0.0
    assert d.host.send[0] > 0 and d.host.codec["int8"]["encode_s"][0] > d.host.codec["float32"]["encode_s"][0] == 0
    assert 0 < d.host.powersgd_s < 1e-3
    ddp = predict(d, Cluster(4, math.inf), Settings(message_bytes), "ddp")
    assert ddp["terms"]["host_s"] == 0.0 and ddp["step_s"] == pytest.approx(ddp["terms"]["compute_s"])
    # every codec of the registry gets its kind's launches: a scaled code's, a cast's, float32's none
    from decoupled.plan.methods import CODEC_LAUNCHES
    every = on_device(_with(p, codec={name: _codec(n, 1.0, 1.0) for name in CODECS}), [1e6] * n, [3e6] * n,
                      [1e6] * n, [1] * n, 2 * n, 100.0, 0.5, 1e-5)
    for name, c in CODECS.items():
        kind = "float32" if name == "float32" else "scaled" if c.scaled else "cast"
        assert every.host.codec[name]["encode_s"][0] == pytest.approx(CODEC_LAUNCHES[kind][0] * 1e-5), name


def test_fit_line():
    assert fit_line([(0.0, 1.0), (10.0, 2.0), (20.0, 3.0)]) == HostFit(1.0, 0.1)
    assert fit_line([(1.0, 2.0), (2.0, 1.0)]) == HostFit(1.5, 0.0)  # a negative slope: all fixed
    fit = fit_line([(10.0, 0.0), (20.0, 3.0)])  # a negative intercept: all per byte
    assert fit.fixed_s == 0.0 and fit.s_per_byte > 0


@pytest.mark.slow
def test_host_measurement():
    """host.measure_host's two gloo processes: every constant measured and non-negative, a message's
    and an all-reduce's CPU positive."""
    from decoupled.plan.host import measure_host
    got = measure_host(steps=2, messages=5)
    for k in ("allreduce", "send", "recv"):
        assert got[k].fixed_s >= 0 and got[k].s_per_byte >= 0, got
        assert got[k].fixed_s + got[k].s_per_byte > 0, got
