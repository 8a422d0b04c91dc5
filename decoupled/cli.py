"""`decoupled train ...`: the one entry point, the same under python -m, the console script,
torchrun and launch/train.py. `decoupled train --nproc-per-node N` launches N local ranks itself
(decoupled/launch.py); `decoupled report` turns run and bench folders into figures and a page;
`decoupled plan` predicts every training method on a cluster from one measurement (decoupled/plan/)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .api import load_config
from .config import FALLBACKS
from .job import ConfigError


def _parser(raw: list[str] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decoupled", description="Decoupled / layer-wise parallel training.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a network (mode, model, objective from the config)")
    t.add_argument("--config", help="TOML config file (default: small MLP on the embedded digits data)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>)")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from the last epoch every rank completed; its config.toml "
                        "is the base, --config/--set given here win (e.g. --set train.epochs=4 to extend)")
    t.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="launch N local ranks of this job (as `torchrun --standalone --nproc-per-node N`; "
                        "train.mode sync or async); on a cluster call torchrun yourself")
    t.add_argument("--compare-e2e", action="store_true",
                   help="then train the end-to-end backprop baseline on the same config into RUN/e2e and print "
                        "a one-line comparison (also in summary.json: e2e_baseline)")
    r = sub.add_parser("report", help="figures (PNG) and a markdown page of run directories and bench folders")
    r.add_argument("runs", nargs="*", type=Path, metavar="RUN_OR_BENCH",
                   help="run directories, bench folders, or folders holding them")
    r.add_argument("--regime", nargs="+", type=Path, metavar="DIR",
                   help="instead: the regime map (time to target against link rate) into OUT/regime.md, .json and "
                        ".png, one network per DIR, each holding its `bench --nodes` outputs (curves/, probes/, "
                        "shaped/; docs/benchmarking.md)")
    r.add_argument("--out", type=Path, default=Path("report"), help="output folder (default ./report)")
    e = sub.add_parser("eval", help="early-exit evaluation of a finished run: per-exit accuracy and the exit "
                                    "curve (accuracy vs inference FLOPs) into its summary.json and exit_curve.png")
    e.add_argument("--run", type=Path, required=True, metavar="DIR", help="the run directory")
    e.add_argument("--thresholds", metavar="T1,T2,...",
                   help="confidence thresholds to sweep (default: 0..1, denser near 1)")
    e.add_argument("--fallback", choices=FALLBACKS,
                   help="who answers when no exit passes (default: the run's objective.exit_fallback)")
    from .plan.cli import add_parser as add_plan
    add_plan(sub)
    if raw[:1] == ["bench"]:  # `decoupled bench ...`: every baseline side by side
        from .bench import add_parser as add_bench  # imports the engine, so torch: only when asked for
        add_bench(sub)
    else:  # listed in `decoupled --help`; a config error or a launch never pays for torch's import
        sub.add_parser("bench", help="time every baseline side by side (e2e, sequential, sync, async, gpipe); "
                                     "decoupled bench --help")
    return p


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser(raw).parse_args(raw)
    if args.command == "eval":
        return _eval(args)
    if args.command == "report":
        from .report import main as report_main
        return report_main(args.runs, args.out, args.regime)
    if args.command == "plan":
        from .plan.cli import main as plan_main
        return plan_main(args)
    if args.command == "bench":
        from .bench import main as bench_main
        try:
            return bench_main(args)
        except ConfigError as e:
            return _fail(f"config error: {e}", 2)
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:  # not yet a worker: launch
        return _launch_train(args, raw)
    try:
        cfg, out = _train_config(args)
        resume: bool | str = bool(args.resume)
        if not resume and out and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = "auto"  # torchrun --max-restarts restarted us: pick up our own checkpoints
        from .api import train  # the Python API (decoupled.train); heavy imports after validation
        from .console import format_summary
        summary = train(cfg, out=out, resume=resume)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    except Exception as e:  # noqa: BLE001 - a training failure: say what, exit non-zero
        from .checkpoint import CheckpointError
        from .engine.precision import NonFiniteError
        from .engine.ranks.transport import PeerError
        if not isinstance(e, (PeerError, NonFiniteError, CheckpointError)):
            raise
        return _fail(f"error: {e}", 1)
    if summary is not None:  # rank 0
        print(format_summary(summary))
        print(f"run directory: {summary['run_dir']}", flush=True)
        if args.compare_e2e:
            return _compare_e2e(cfg, Path(summary["run_dir"]))
    return 0


def _train_config(args):
    """The job's config and run directory from --config / --set / --resume (validated)."""
    if args.resume:
        if args.out and args.out != args.resume:
            raise ConfigError("--out and --resume name different folders; a resumed run stays in its folder")
        base = args.resume / "config.toml"
        if not base.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.toml there; is it a run directory?")
        cfg = load_config(base, [], validate=False)
        if args.config:
            cfg = load_config(args.config, [], base=cfg, validate=False)
        cfg, out = load_config(None, args.overrides, base=cfg), args.resume
    else:
        cfg, out = load_config(args.config, args.overrides), args.out
    from .live import require_tensorboard
    require_tensorboard(cfg)
    return cfg, out


def _launch_train(args, raw: list[str]) -> int:
    """`decoupled train --nproc-per-node N ...`: validate once here, then N workers under torch's
    elastic agent, all writing one run directory; then the e2e comparison if asked."""
    from .launch import launch, strip_flag
    from .modes import MODES
    n = args.nproc_per_node
    try:
        if n < 1:
            raise ConfigError(f"--nproc-per-node {n}: expected a number of ranks >= 1")
        cfg, out = _train_config(args)
        distributed = MODES[cfg.train.mode].distributed
        if n > 1 and not distributed:
            raise ConfigError(f"--nproc-per-node {n} with train.mode={cfg.train.mode!r}, which runs in one process: "
                              "add --set train.mode=sync (or async)")
        reps = cfg.dist.replicas
        if isinstance(reps, list) and reps and sum(reps) != n and distributed:
            raise ConfigError(f"dist.replicas={reps} holds {sum(reps)} ranks but --nproc-per-node is {n}; make "
                              f"them agree (--nproc-per-node {sum(reps)})")
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    from .run_job import default_out
    out = out or default_out()  # chosen here, so the comparison knows where the run is
    worker = [a for a in strip_flag(raw) if a != "--compare-e2e"]
    if args.out is None and args.resume is None:
        worker += ["--out", str(out)]
    code, message = launch(n, ["decoupled", *worker])
    if code:
        return _fail(message, code)
    return _compare_e2e(cfg, out) if args.compare_e2e else 0


def _compare_e2e(cfg, run_dir: Path) -> int:
    """The end-to-end backprop baseline on the same config (RUN/e2e), and one line against the run."""
    import json
    from dataclasses import replace
    from .run_job import train
    run = json.loads((run_dir / "summary.json").read_text())
    base = load_config(None, ["train.mode=e2e"], base=replace(cfg, train=replace(cfg.train, quiet=True)))
    print(f"end-to-end baseline (train.mode=e2e, 1 process) into {run_dir / 'e2e'} ...", flush=True)
    e2e = train(base, run_dir / "e2e")
    acc = e2e["layers"][-1]["test_acc"]
    run["e2e_baseline"] = {"run_dir": e2e["run_dir"], "test_acc": acc, "ensemble_test_acc": e2e["ensemble_test_acc"],
                           "wall_s": e2e["wall_s"]}
    (run_dir / "summary.json").write_text(json.dumps(run, indent=2))
    accs = " / ".join(f"{layer['test_acc']:.4f}" for layer in run["layers"])
    print(f"compare: {run['mode']} on {run['world_size']} rank(s): blocks {accs} in {run['wall_s']:.1f}s | "
          f"end-to-end backprop: {acc:.4f} (last block) in {e2e['wall_s']:.1f}s", flush=True)
    return 0


def _eval(args) -> int:
    try:
        thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else None
    except ValueError:
        return _fail(f"--thresholds {args.thresholds!r}: expected comma-separated numbers, e.g. 0.5,0.9,0.99", 2)
    from .rescore import evaluate_run
    try:
        summary = evaluate_run(args.run, thresholds, args.fallback)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    print(f"{'threshold':>9} {'accuracy':>8} {'MFLOPs':>8}  exit fractions")
    for r in summary["exit_curve"]:
        print(f"{r['threshold']:9.3f} {r['accuracy']:8.4f} {r['avg_flops'] / 1e6:8.4f}  "
              + " ".join(f"{f:.3f}" for f in r["exit_fraction"]))
    print(f"exit curve: {args.run / 'summary.json'} and {args.run / 'exit_curve.png'}")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"decoupled: {message}", file=sys.stderr)
    if "WORLD_SIZE" in os.environ:
        # Under torchrun a peer may be gone: exit now rather than risk a hang in process-group or
        # thread teardown at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
