"""`decoupled bench`: every way to train one model split, measured side by side on the same cores.

One invocation times, on the same config, data and K-rank split:
  stages        each rank's blocks alone (forward + local backward + head + step) on cached inputs:
                t_k seconds per epoch, bound = sum(t_k) / max(t_k), bound throughput = n / max(t_k)
  e2e           end-to-end backprop in one process, 1 thread    (the real `decoupled train`)
  e2e-Kthreads  the same with K threads (OMP_NUM_THREADS=K)
  sequential    greedy block after block on cached pseudo-inputs
  sync, async   the decoupled engine on K torchrun ranks
  e2e-checkpoint  e2e with activation checkpointing per block: the memory bar for the per-rank peaks
  ddp, fsdp     the e2e network on K ranks: torch DDP, FSDP2
  ddp-bf16, ddp-powersgd, localsgd
                the rows people use on slow links (not in the default): DDP with torch's bf16 or
                PowerSGD compression hook, post-local SGD (bench/strategies.py; their bench flags:
                --bucket-mb, --powersgd-rank, --powersgd-start, --localsgd-period, --localsgd-warmup)
  gpipe, 1f1b   the e2e network through torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B),
                each on its own best contiguous K-way split of the measured per-block e2e costs
                and at its best microbatch count of --microbatches

Every row is a fresh process (or a torchrun job), because peak memory (CPU VmHWM) is per process.
Timing: every row trains 1 + repeats epochs; the first is warm-up and is dropped; a row's time is
the median of the other epochs' wall times, read from the run's own metrics.jsonl stamps (or timed
by the worker), so process start, data loading and the final evaluation never count. Throughput is
training samples per second of that median epoch.

    decoupled bench --config launch/configs/bench_cpu.toml --ranks 2 --out runs/bench
    decoupled bench --sweep depth --config launch/configs/bench_cpu.toml --out runs/sweep
    decoupled bench --sweep layouts --config launch/configs/layouts_cpu.toml --ranks 3 --out runs/layouts
    decoupled bench --tune optim.lr=0.01,0.03,0.1 --config launch/configs/bench_cpu.toml --out runs/tuned
    decoupled bench --rows ddp,ddp-powersgd,localsgd --tune powersgd-rank=1,2,4 --config ... --out runs/slow
    decoupled bench --guard                     the speed guard (guard.py): ratios against committed thresholds
    decoupled bench --nodes 2 --link loopback,1gbit,100mbit --config ... --out runs/links
                                                every row on 2 emulated nodes per link rate (cluster.py)

Writes bench.json, bench.md and bench.png (sweep: sweep.json, sweep.md, sweep.png) into --out; with
--nodes, into --out/<link> for each link, beside cluster.json and cluster.md (every link's measured rate,
the rows' throughput per link). A bench into a folder that holds finished rows reuses them (resume.py).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..config import ConfigError
from .cluster import MAX_NODES, Cluster, Nodes, parse_links
from .knobs import Knobs, add_arguments, flag, from_args, given
from .launcher import signals_exit, using
from .rows import DEFAULT_ROWS, MICROBATCHES, REGISTRY, ROWS, Curve, bench
from .tune import Tune, parse_tune
from .report import markdown, write_summary
from .layouts import layouts
from .straggler import straggler
from .guard import main as guard_main
from .sweep import DEFAULT_HIERARCHIES, parse_lists, sweep_depth


def add_parser(sub) -> None:
    """`decoupled bench ...` (wired in cli.py)."""
    b = sub.add_parser("bench", help="time every baseline side by side (e2e, sequential, sync, async, gpipe)")
    b.add_argument("--config", help="TOML config (e.g. launch/configs/bench_cpu.toml)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    b.add_argument("--ranks", type=int, default=2,
                   help="K: torchrun ranks for sync/async/gpipe, threads of e2e-Kthreads")
    b.add_argument("--out", type=Path, help="output folder (default runs/bench-<timestamp>)")
    b.add_argument("--repeats", type=int, default=3, help="timed epochs per row, after one warm-up epoch")
    b.add_argument("--microbatches", default=",".join(map(str, MICROBATCHES)),
                   help="gpipe / 1f1b: microbatch counts to sweep, comma-separated (those that divide the batch "
                        "and are >= --ranks run; the row reports the fastest)")
    b.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated subset of {','.join(ROWS)} (default: "
                        f"{', '.join(r for r in ROWS if r not in DEFAULT_ROWS)} left out)")
    b.add_argument("--sweep", choices=["depth", "straggler", "layouts"],
                   help="instead: depth = e2e vs per-rank peak memory as VGG depth grows; straggler = sync vs "
                        "async (each replay.budget) with one slow rank (dist.placement); layouts = sync on --ranks "
                        "ranks with an even split, dist.placement=auto, and auto with dist.replicas=auto")
    b.add_argument("--hierarchies", default=DEFAULT_HIERARCHIES,
                   help="--sweep depth: VGG hierarchies, one block and one rank per stage")
    b.add_argument("--mmap-threshold", type=int,
                   help="MALLOC_MMAP_THRESHOLD_ for every process, so CPU VmHWM tracks tensor bytes rather than "
                        "glibc heap growth (slows steps); default 65536 for --sweep, 0 (glibc's own) for the bench")
    b.add_argument("--guard", action="store_true",
                   help="the speed guard instead: machine-independent ratios (async blocking under a straggler, sync "
                        "over its bound, e2e overhead, wire bytes, receive cost) against committed thresholds; "
                        "exits 1 on a miss (about 1.5 minutes on 2 cores; bench/guard.py)")
    b.add_argument("--curve", action="store_true",
                   help="time to accuracy: the rows that can (all but sequential: e2e*, sync*, async, the "
                        "data-parallel rows, gpipe, 1f1b) "
                        "train --epochs epochs, each followed by a test evaluation outside the timed window "
                        "(bench.json: curve; --eval-every-steps: between an epoch's batches too)")
    b.add_argument("--epochs", type=int, help="--curve: epochs per row (default: the config's train.epochs)")
    b.add_argument("--target-acc", type=float, help="--curve: the test accuracy whose first time is time_to_target_s")
    b.add_argument("--eval-every-steps", type=int, default=0, metavar="N",
                   help="--curve: evaluate after every N source steps (rank 0's batches, counted across epochs) as "
                        "well, outside the timed window, so time to target resolves to N batches, not an epoch "
                        "(train.eval_every_steps); 0 = after every epoch only")
    b.add_argument("--eval-subset", type=int, default=0, metavar="M",
                   help="--curve --eval-every-steps: the mid-epoch evaluations score the first M test samples, "
                        "the same for every row and seed (0 = all); bench.json and bench.md state M and the standard "
                        "error sqrt(p(1-p)/M) at the target (train.eval_subset); epoch ends score the whole test set")
    b.add_argument("--seeds", type=int, default=1,
                   help="--curve: runs of every curve row (train.seed, +1, ...): mean, std and min-max of final "
                        "accuracy and of time to target (over the seeds that reached it, with their count), and "
                        "the median time to target over all seeds, a seed that never reached it counting as never")
    b.add_argument("--tune", metavar="SECTION.KEY=V1,V2,...",
                   help="each row at its own best value of one setting: every row first trains one epoch on the "
                        "first seed per value (the same grid for every row) and keeps the value of the best final "
                        "validation accuracy (last block's head), then runs with it (bench.json: rows[].tune; "
                        "bench/tune.py), e.g. --tune optim.lr=0.01,0.03,0.1; a data-parallel bench flag by its name "
                        "tunes the rows that read it, e.g. --tune powersgd-rank=1,2,4")
    b.add_argument("--val-fraction", type=float,
                   help="--tune: data.val_fraction, the stratified hold-out tuning scores on; every run, tuning and "
                        "real, trains on the rest (default 0.1)")
    b.add_argument("--timeout", type=float, default=900.0, help="seconds per row before it counts as failed")
    add_arguments(b)  # the data-parallel rows' bench flags (knobs.py)
    b.add_argument("--nodes", type=int, default=0, metavar="N",
                   help="run every torchrun job across N emulated nodes (one network namespace each, joined through a "
                        "bridge; ranks spread evenly, node 0 first); needs root. Each --link rate writes OUT/<link>")
    b.add_argument("--link", metavar="RATE[,RATE...]",
                   help="--nodes: every node's link, shaped with tbf to each rate in turn (a sweep), e.g. "
                        "loopback,1gbit,100mbit; loopback = the same path unshaped (default); bandwidth only")


def main(args) -> int:
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = [r for r in rows if r not in ROWS]
    try:
        micro = [int(v) for v in str(args.microbatches).split(",") if v.strip()]
    except ValueError:
        micro = []
    if bad or args.ranks < 1 or args.repeats < 1 or not micro or min(micro) < 1:
        raise ConfigError(f"bench: --rows must be among {', '.join(ROWS)} (got {bad}); --ranks, --repeats and "
                          "--microbatches must be >= 1")
    curve = _curve(args)
    tune = _tune(args)
    knobs = _knobs(args, rows, tune)
    links = _links(args)
    out = args.out or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    with signals_exit():  # SIGTERM / SIGHUP: stop the jobs and remove the namespaces on the way out
        if args.guard:  # its slow-link figure runs on emulated nodes too
            return guard_main(args.out)
        if not links:
            return _bench(args, out, rows, micro, curve, tune, knobs)
        codes = []
        with Cluster(args.nodes) as cluster:
            records = []
            for link in links:  # every rate measured before any row runs: a link that cannot be shaped fails now
                cluster.shape(link)
                records.append({"nodes": args.nodes, **cluster.measure(), "folder": link})
                print(f"bench: {args.nodes} nodes, link {link}: a raw TCP stream ran at "
                      f"{records[-1]['tcp_bytes_per_s'] / 1e6:.2f} MB/s", flush=True)
            for link, record in zip(links, records):
                cluster.shape(link)
                print(f"bench: link {link}, into {out / link}", flush=True)
                with using(Nodes(cluster, record)):
                    codes.append(_bench(args, out / link, rows, micro, curve, tune, knobs))
                print(write_summary(out, records) + f"written: {out}/cluster.json, cluster.md", flush=True)
        return max(codes)


def _bench(args, out: Path, rows: tuple[str, ...], micro: list[int], curve, tune, knobs: Knobs) -> int:
    """The rows (or a sweep) into `out`, through the launcher in use (Note [one launcher per bench])."""
    if args.sweep == "depth":
        threshold = 65536 if args.mmap_threshold is None else args.mmap_threshold
        sweep_depth(args.config, args.overrides, out, parse_lists(args.hierarchies), args.timeout, threshold)
        print((out / "sweep.md").read_text() + f"written: {out}/sweep.json, sweep.md, sweep.png")
        return 0
    if args.sweep == "layouts":
        layouts(args.config, args.overrides, args.ranks, out, args.timeout)
        print((out / "layouts.md").read_text() + f"written: {out}/layouts.json, layouts.md")
        return 0
    if args.sweep == "straggler":
        straggler(args.config, args.overrides, out, args.timeout)
        print((out / "straggler.md").read_text() + f"written: {out}/straggler.json, straggler.md")
        return 0
    overrides = list(args.overrides) + ([f"data.val_fraction={tune.val_fraction}"] if tune else [])
    result = bench(args.config, overrides, args.ranks, out, args.repeats, micro, rows,
                   args.timeout, args.mmap_threshold or 0, curve, tune, knobs)
    print(markdown(result) + f"written: {out}/bench.json, bench.md, bench.png")
    return 1 if any("error" in r for r in result["rows"]) else 0


def _links(args) -> list[str] | None:
    """--nodes and --link, checked before anything runs: the link rates to sweep, None without --nodes."""
    if not args.nodes:
        if args.link:
            raise ConfigError(f"bench: --link {args.link} shapes the links between emulated nodes; add --nodes N "
                              "(e.g. --nodes 2)")
        return None
    if not 2 <= args.nodes <= MAX_NODES:
        raise ConfigError(f"bench: --nodes {args.nodes}: emulated nodes need at least 2 (one node is this machine: "
                          f"drop --nodes) and at most {MAX_NODES}")
    if args.guard:
        raise ConfigError("bench: --guard measures this machine against committed thresholds; drop --nodes")
    if args.sweep != "straggler" and args.sweep != "depth" and args.ranks < args.nodes:
        raise ConfigError(f"bench: --ranks {args.ranks} over --nodes {args.nodes} would leave a node without a rank; "
                          f"give --ranks >= {args.nodes}")
    return parse_links(args.link or "loopback")


def _curve(args) -> Curve | None:
    """--curve and its options, checked before anything runs."""
    if not args.curve:
        if args.epochs is not None or args.target_acc is not None or args.seeds != 1 or args.eval_every_steps \
                or args.eval_subset:
            raise ConfigError("bench: --epochs, --target-acc, --seeds, --eval-every-steps and --eval-subset apply to "
                              "--curve; add --curve")
        return None
    if args.sweep or args.guard:
        raise ConfigError("bench: --curve applies to the row bench, not to --sweep or --guard; drop one")
    if (args.epochs is not None and args.epochs < 1) or args.seeds < 1:
        raise ConfigError(f"bench: --epochs and --seeds must be >= 1 (got {args.epochs}, {args.seeds})")
    if args.target_acc is not None and not 0.0 < args.target_acc <= 1.0:
        raise ConfigError(f"bench: --target-acc is a test accuracy in (0, 1] (got {args.target_acc}); e.g. 0.98")
    if args.eval_every_steps < 0 or args.eval_subset < 0:
        raise ConfigError(f"bench: --eval-every-steps and --eval-subset must be >= 0 (got {args.eval_every_steps}, "
                          f"{args.eval_subset}); e.g. --eval-every-steps 20 --eval-subset 2000")
    if args.eval_subset and not args.eval_every_steps:
        raise ConfigError(f"bench: --eval-subset {args.eval_subset} sizes the mid-epoch evaluations' test subset; "
                          "add --eval-every-steps N (epoch ends always score the whole test set)")
    return Curve(args.epochs, args.target_acc, args.seeds, args.eval_every_steps, args.eval_subset)


def _tune(args) -> Tune | None:
    """--tune and --val-fraction, checked (every value of the grid loads) before anything runs."""
    if args.tune is None:
        if args.val_fraction is not None:
            raise ConfigError("bench: --val-fraction applies to --tune; add --tune, or hold out a validation split "
                              "with --set data.val_fraction=F")
        return None
    if args.sweep or args.guard:
        raise ConfigError("bench: --tune applies to the row bench, not to --sweep or --guard; drop one")
    if any(o.split("=")[0].strip() == "data.val_fraction" for o in args.overrides):
        raise ConfigError("bench: with --tune the hold-out is --val-fraction; drop --set data.val_fraction")
    return parse_tune(args.tune, args.val_fraction, args.config, args.overrides)


def _knobs(args, rows: tuple[str, ...], tune) -> Knobs:
    """The data-parallel rows' bench flags, checked before anything runs: each value, and that a row of
    --rows reads each flag given or tuned (a flag no row reads would silently do nothing)."""
    knobs = from_args(args)
    if given(knobs) and (args.sweep or args.guard):
        raise ConfigError(f"bench {flag(given(knobs)[0])} applies to the row bench, not to --sweep or --guard; "
                          "drop one")
    reads = {k for r in rows for k in REGISTRY[r].knobs}
    for name in [*given(knobs), *([tune.knob] if tune and tune.knob else [])]:
        if name not in reads:
            which = [r for r in ROWS if name in REGISTRY[r].knobs]
            raise ConfigError(f"bench {flag(name)} does nothing here: it applies to {', '.join(which)}, none of them "
                              f"in --rows; add one to --rows (e.g. {which[0]})")
    if tune and tune.knob in given(knobs):
        raise ConfigError(f"bench --tune {tune.key} sweeps {flag(tune.knob)}; drop {flag(tune.knob)}")
    return knobs
