"""`decoupled plan`: what to run on a cluster, predicted from one short measurement on this machine.

    decoupled plan --config launch/configs/bench_cpu.toml --ranks 2,4,8 --link 100mbit,1gbit --out runs/plan

Measures the job's network once (measure.profile: every block's decoupled step and its share of the
e2e network at data.batch_size and at a quarter of it, ExactMemory's bytes of each, the activation
bytes at every cut), or with --device-tflops plans a device from FLOPs (methods.on_device); then for
every method, K and link predicts samples/s, exact per-rank training memory, bytes per sample on the
slowest link and the best layout (methods.py, equations in docs/plan.md). Writes a table on stdout,
DIR/plan.json (one row per method, K and link, named and shaped as bench.json's rows) and
DIR/plan.png (samples/s against K = 2..64 per method, a panel per link).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

from ..config import ConfigError
from .methods import ONE_RANK_PER_GROUP, Cluster, Infeasible, PlanError, Settings, predict

METHODS = ("sync", "sync-int8", "sync-auto", "async", "ddp", "ddp-powersgd", "localsgd", "fsdp", "gpipe", "1f1b")
SWEEP = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # the plot's K
UNITS = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}  # tc's rates: bits, powers of 1000
LAUNCH_US = 10.0  # a kernel launch's floor on a device planned from FLOPs (--launch-us)


def parse_rate(text: str, option: str = "--link") -> float:
    """'100mbit' | '1gbit' | '2.5gbit' | '800kbit' -> bytes/s; 'loopback' (an unshaped link) -> inf."""
    t = text.strip().lower()
    if t in ("loopback", "inf"):
        return math.inf
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", t)
    if not m or float(m.group(1)) <= 0:
        raise PlanError(f"{option} {text!r}: expected a rate such as 100mbit, 1gbit, 2.5gbit, 800kbit or loopback")
    return float(m.group(1)) * UNITS[m.group(2)]


def _ints(text: str, option: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        raise PlanError(f"{option} {text!r}: expected comma-separated whole numbers, e.g. 2,4,8") from None
    if any(v < 2 for v in out) if option == "--ranks" else any(v < 1 for v in out):
        raise PlanError(f"{option} {text!r}: every value must be >= {2 if option == '--ranks' else 1}")
    return out


def add_parser(sub) -> None:
    """`decoupled plan ...` (wired in decoupled/cli.py)."""
    p = sub.add_parser("plan", help="predict samples/s, memory and link bytes of every training method on a cluster "
                                    "from one short measurement; decoupled plan --help")
    p.add_argument("--config", help="TOML config of the job (default: the default job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--ranks", required=True, metavar="K[,K...]", help="ranks (devices) to plan for, e.g. 2,4,8")
    p.add_argument("--link", required=True, metavar="RATE[,RATE...]",
                   help="the link between nodes: 100mbit, 1gbit, 10gbit, ... or loopback (no limit)")
    p.add_argument("--nodes", type=int, default=0, metavar="N",
                   help="ranks spread evenly over N nodes, consecutive ranks per node (default: one rank a node)")
    p.add_argument("--ranks-per-node", type=int, default=0, metavar="G",
                   help="instead of --nodes: G ranks a node at every K (K / G nodes, rounded up; a cluster of GPU "
                        "servers, e.g. 8 with --intra-link 400gbit)")
    p.add_argument("--intra-link", default="loopback", metavar="RATE",
                   help="the link between ranks of one node (default loopback: no limit)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--device-tflops", type=float, metavar="F",
                   help="plan a device with F TFLOPS (e.g. 989 for an H100's bf16 dense) from FLOPs instead of "
                        "timing this machine")
    p.add_argument("--efficiency", type=float, default=0.4, metavar="E",
                   help="with --device-tflops: the fraction of peak a step attains (default 0.4)")
    p.add_argument("--launch-us", type=float, default=LAUNCH_US, metavar="US",
                   help=f"with --device-tflops: the floor of one kernel launch (default {LAUNCH_US:g} us)")
    p.add_argument("--measure-batch", type=int, metavar="B",
                   help="measure at B rows instead of data.batch_size and scale (a network too big to measure)")
    p.add_argument("--host-terms", choices=("measure", "zero"), default="measure",
                   help="on a CPU job: measure gloo's all-reduce and the transport's host costs between two local "
                        "processes (default), or leave them 0")
    p.add_argument("--microbatches", metavar="M[,M...]",
                   help="gpipe / 1f1b: the microbatch counts to choose from, as the bench's --microbatches "
                        "(default: every power of two dividing data.batch_size)")
    p.add_argument("--powersgd-rank", type=int, default=4, help="ddp-powersgd: the rank of its factors (default 4)")
    p.add_argument("--localsgd-period", type=int, default=16,
                   help="localsgd: steps between parameter averages (default 16)")
    p.add_argument("--out", type=Path, help="output folder for plan.json and plan.png (default runs/plan-<time>)")


def main(args) -> int:
    try:
        return _plan(args)
    except (PlanError, ConfigError) as e:
        print(f"decoupled: plan: {e}", file=sys.stderr)
        return 2


def _plan(args) -> int:
    ranks = _ints(args.ranks, "--ranks")
    links = [(t.strip().lower(), parse_rate(t)) for t in args.link.split(",")]
    intra = parse_rate(args.intra_link, "--intra-link")
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise PlanError(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    if args.nodes < 0 or (args.nodes and args.nodes > min(ranks)):
        raise PlanError(f"--nodes {args.nodes}: expected 1 to {min(ranks)} (the fewest --ranks), or 0: a node a rank")
    if args.ranks_per_node < 0 or (args.ranks_per_node and args.nodes):
        raise PlanError(f"--ranks-per-node {args.ranks_per_node}: a positive count, and not with --nodes")
    for option, v in (("--device-tflops", args.device_tflops), ("--efficiency", args.efficiency),
                      ("--launch-us", args.launch_us), ("--measure-batch", args.measure_batch),
                      ("--powersgd-rank", args.powersgd_rank), ("--localsgd-period", args.localsgd_period)):
        if v is not None and not v > 0:
            raise PlanError(f"{option} {v}: expected a positive number")
    if args.efficiency > 1:
        raise PlanError(f"--efficiency {args.efficiency}: a fraction of peak, at most 1")
    microbatches = tuple(_ints(args.microbatches, "--microbatches")) if args.microbatches else ()
    if any(m < 1 for m in microbatches):
        raise PlanError(f"--microbatches {args.microbatches}: each count at least 1")
    from ..api import load_config
    from .measure_job import measure_job
    cfg = load_config(args.config, args.overrides)
    prof, info = measure_job(cfg, args)
    n = len(prof.fwd_s)
    narrow = [m for m in methods if m in ONE_RANK_PER_GROUP]
    if narrow and max(ranks) > n:
        raise PlanError(f"--ranks {args.ranks}: {', '.join(narrow)} hold at least one block per rank and the model "
                        f"has {n} blocks; plan at most {n} ranks for them, use sync-auto (replicas) or ddp / fsdp "
                        "(--methods), or split the model finer (model.blocks)")
    placement = cfg.dist.placement if isinstance(cfg.dist.placement, list) else []
    if placement and sum(placement) != n:
        raise PlanError(f"dist.placement={list(placement)} places {sum(placement)} blocks and the model has {n}: "
                        "give one count per rank that sum to the blocks, or leave it empty (the plan searches)")
    from ..engine.ranks.transport import message_bytes
    s = Settings(message_bytes, wire=cfg.dist.wire_dtype, max_inflight=cfg.dist.max_inflight,
                 replay_capacity=cfg.replay.capacity, bucket_bytes=cfg.dist.allreduce_bucket_mb * 2 ** 20,
                 powersgd_rank=args.powersgd_rank, localsgd_period=args.localsgd_period,
                 placement=tuple(int(b) for b in placement), microbatches=microbatches)

    def row(method: str, k: int, link: tuple[str, float]) -> dict:
        nodes = math.ceil(k / args.ranks_per_node) if args.ranks_per_node else args.nodes
        c = Cluster(k, link[1], nodes, intra)
        head = {"method": method, "mode": method, "ranks": k, "nodes": nodes or k, "link": link[0],
                "link_bytes_per_s": None if math.isinf(link[1]) else link[1]}
        try:
            return {**head, **predict(prof, c, s, method)}
        except Infeasible as e:
            return {**head, "samples_per_s": None, "error": str(e)}

    rows = [row(m, k, link) for link in links for k in ranks for m in methods]
    sweep = [row(m, k, link) for link in links for k in SWEEP for m in methods]
    out = args.out or Path("runs") / f"plan-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    result = {**info, "settings": {k: v for k, v in vars(s).items() if k != "message"},
              "nodes": args.nodes, "ranks_per_node": args.ranks_per_node, "intra_link": args.intra_link,
              "notes": prof.notes,
              "assumptions": ASSUMPTIONS, "rows": rows, "sweep": sweep}
    (out / "plan.json").write_text(json.dumps(result, indent=2, default=float))
    from .report import chart, table
    print(table(result))
    chart(result, out / "plan.png")
    print(f"plan: {out / 'plan.json'} and {out / 'plan.png'}")
    return 0


ASSUMPTIONS = [
    "a rank has a core (or device) of its own: on a machine with fewer cores than ranks the measured times exceed "
    "the prediction; on gloo the communication's host work (constants: allreduce_host, send_host, recv_host) "
    "takes that core's time, measured between two local processes; on a device planned from FLOPs (NCCL) "
    "collectives take no host time",
    "links: bandwidth only, no latency; each rank sends on a link of its own (full duplex)",
    "a block's time at r rows is linear in r through its two measured batch sizes (methods.at_rows)",
]


def parse_argv(argv: list[str]) -> argparse.Namespace:
    """The command line alone (tests)."""
    p = argparse.ArgumentParser(prog="decoupled")
    add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["plan", *argv])
