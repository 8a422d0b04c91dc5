"""The bookkeeping of tests/gpu/run.sh, so that no shell parses anything: each step's record, the checks
of a finished training run, the comparison of sync with simultaneous, and the summary page.

    python tests/gpu/script_summary.py add STEPS_JSONL --id ID --what TEXT --rc RC --seconds S --limit L --log LOG
    python tests/gpu/script_summary.py run-job --dir RUN --world N --backend B --device D -- COMMAND...
    python tests/gpu/script_summary.py compare --ref SIM_RUN --got SYNC_RUN --ref-log LOG --got-log LOG --md OUT.md
    python tests/gpu/script_summary.py render STEPS_JSONL --out gpu-summary.md --header HEADER.md --sections DIR

A step's log may carry lines `NOTE: ...`: the last one is the step's note in the summary (run-job and
compare print one); a pytest step's note is pytest's own last line. No torch import except in run-job's
checks and compare (the checkpoints)."""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

PYTEST_TAIL = re.compile(r"^=*\s*(\d+(?:/\d+)? (?:tests? )?(?:passed|failed|skipped|errors?|deselected|collected|"
                         r"warnings?|xfailed|xpassed)\b.*?)\s*=*$")
LOSS = re.compile(r"loss ((?:b\d+=\S+ ?)+)")
EPOCH = re.compile(r"epoch (\d+)/(\d+)")

# sync against simultaneous when they differ at all: the tolerance of tests/test_engine.py's NCCL test for
# accuracies (0.05: 18 of the digits' 359 test images), and 5 % of a printed final loss (4 decimals)
ACC_TOL = 0.05
LOSS_REL_TOL = 0.05


# ---------------------------------------------------------------------------------------------- step records
def _tail(log: Path, n: int) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def status_of(rc: int, log: Path, pytest: bool) -> tuple[str, str]:
    """(pass | fail | skip, note) of a finished step from its exit status and log."""
    lines = _tail(log, 400)
    notes = [ln[len("NOTE: "):] for ln in lines if ln.startswith("NOTE: ")]
    note = notes[-1] if notes else ""
    if pytest:
        tails = [m.group(1) for ln in lines if (m := PYTEST_TAIL.match(ln.strip()))]
        note = tails[-1] if tails else note
    if rc in (124, 137):
        return "fail", f"timed out: killed at its limit (exit {rc})" + (f"; {note}" if note else "")
    if pytest and rc == 5:
        return "skip", "no test selected (pytest exit 5)"
    if rc != 0:
        return "fail", f"exit {rc}" + (f"; {note}" if note else "")
    if pytest and "skipped" in note and not re.search(r"\d+ passed", note):
        return "skip", note  # every selected test skipped (no CUDA)
    return "pass", note


def add(args) -> int:
    log = Path(args.log) if args.log else None
    if args.status:
        status, note = args.status, args.note or ""
    else:
        status, note = status_of(args.rc, log, args.pytest)
        if args.note:
            note = f"{args.note}; {note}" if note else args.note
    rec = {"id": args.id, "what": args.what, "status": status, "seconds": round(args.seconds, 1),
           "limit": args.limit, "note": note, "command": args.cmd or "", "log": str(log) if log else "",
           "rc": args.rc}
    with open(args.steps, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"[{status}] {args.id} ({args.seconds:.1f}s) {note}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- a training job
def run_job(args) -> int:
    """Run the training command (its output goes to this step's log), then check its run directory."""
    rc = subprocess.call(args.command)
    if rc != 0:
        print(f"NOTE: the training command exited {rc}", flush=True)
        return rc
    problems, s = check_run(Path(args.dir), args.world, args.backend, args.device)
    accs = " / ".join(f"{layer['test_acc']:.4f}" for layer in s.get("layers", []))
    where = f"{s.get('world_size')} rank(s), backend {s.get('backend', '-')}, {s.get('device')}"
    if problems:
        print("NOTE: " + "; ".join(problems) + f" ({where})", flush=True)
        return 1
    print(f"NOTE: {where}; blocks {accs} (ensemble {s['ensemble_test_acc']:.4f}); {s['wall_s']:.1f}s", flush=True)
    return 0


def check_run(run: Path, world: int, backend: str, device: str) -> tuple[list[str], dict]:
    try:
        s = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return [f"no summary.json in {run}: {e}"], {}
    problems = []
    if s.get("world_size") != world:
        problems.append(f"world_size {s.get('world_size')}, expected {world}")
    if backend and s.get("backend") != backend:
        problems.append(f"backend {s.get('backend')}, expected {backend}")
    if not str(s.get("device", "")).startswith(device):
        problems.append(f"device {s.get('device')}, expected {device}")
    layers = s.get("layers") or []
    if not layers or not all(0.0 <= layer["test_acc"] <= 1.0 for layer in layers):
        problems.append(f"test accuracies {[layer.get('test_acc') for layer in layers]}")
    if len({layer["train_samples"] for layer in layers}) > 1 and s.get("mode") == "sync":
        problems.append(f"sync blocks trained different sample counts {[layer['train_samples'] for layer in layers]}")
    return problems, s


# ---------------------------------------------------------------------------------------------- sync == simultaneous
def final_losses(log: Path) -> dict[int, str]:
    """Block -> its loss on the last epoch's line(s), as printed (4 decimals), from a run's stdout."""
    found: dict[int, str] = {}
    for line in _tail(log, 100000):
        e, m = EPOCH.search(line), LOSS.search(line)
        if e and m and e.group(1) == e.group(2):
            for tok in m.group(1).split():
                b, v = tok.split("=", 1)
                found[int(b[1:])] = v
    return found


def stage_states(run: Path) -> dict[int, dict]:
    """Block index -> its block and head tensors at the run's last checkpoint, over every rank's file."""
    from decoupled import checkpoint
    states: dict[int, dict] = {}
    rank = 0
    while (run / "checkpoints").is_dir():
        done = checkpoint.epochs(run, rank)
        if not done:
            break
        for st in checkpoint.load(checkpoint.path(run, rank, done[-1]), map_location="cpu")["stages"]:
            states[st["index"]] = {f"{part}.{k}": v for part in ("block", "objective") for k, v in st[part].items()}
        rank += 1
    return states


def compare(args) -> int:
    import torch
    ref, got = Path(args.ref), Path(args.got)
    lines = [f"### {args.title}", ""]
    try:
        rs, gs = (json.loads((d / "summary.json").read_text()) for d in (ref, got))
    except (OSError, ValueError) as e:
        Path(args.md).write_text("\n".join(lines + [f"Not compared: a run has no summary ({e}).", ""]))
        print(f"NOTE: not compared: {e}", flush=True)
        return 1
    rl, gl = final_losses(Path(args.ref_log)), final_losses(Path(args.got_log))
    ra, ga = [layer["test_acc"] for layer in rs["layers"]], [layer["test_acc"] for layer in gs["layers"]]
    lines += [f"reference: `{rs['mode']}`, {rs['world_size']} process, {rs['device']}; "
              f"compared: `{gs['mode']}`, {gs['world_size']} rank(s), backend {gs.get('backend')}, {gs['device']}", "",
              "| block | test_acc ref | test_acc got | equal | final loss ref | final loss got | equal |",
              "|---:|---:|---:|---|---:|---:|---|"]
    acc_equal = len(ra) == len(ga) and ra == ga
    loss_equal = bool(rl) and rl == gl
    acc_close = len(ra) == len(ga) and all(abs(a - b) <= ACC_TOL for a, b in zip(ra, ga))
    loss_close = bool(rl) and rl.keys() == gl.keys() and all(_close(rl[k], gl[k]) for k in rl)
    for j in range(max(len(ra), len(ga))):
        a, b = (ra[j] if j < len(ra) else None), (ga[j] if j < len(ga) else None)
        la, lb = rl.get(j, "-"), gl.get(j, "-")
        lines.append(f"| {j} | {_f(a)} | {_f(b)} | {'yes' if a == b else 'NO'} | {la} | {lb} | "
                     f"{'yes' if la == lb else 'NO'} |")
    ens_equal = rs.get("ensemble_test_acc") == gs.get("ensemble_test_acc")
    lines += ["", f"ensemble test_acc: {_f(rs.get('ensemble_test_acc'))} vs {_f(gs.get('ensemble_test_acc'))}"]
    # every block's and head's tensors at the last checkpoint
    rw, gw = stage_states(ref), stage_states(got)
    weights_equal, max_diff, n_tensors = None, None, 0
    if rw and rw.keys() == gw.keys():
        weights_equal, max_diff = True, 0.0
        for j in rw:
            if rw[j].keys() != gw[j].keys():
                weights_equal, max_diff = False, math.inf
                break
            for k, t in rw[j].items():
                u = gw[j][k]
                n_tensors += 1
                if not torch.equal(t, u):
                    weights_equal = False
                    if t.is_floating_point() and t.shape == u.shape:
                        max_diff = max(max_diff, (t.double() - u.double()).abs().max().item())
                    else:
                        max_diff = math.inf
        lines.append(f"weights at the last checkpoint: {n_tensors} tensors of {len(rw)} blocks, "
                     + ("equal bit for bit" if weights_equal else f"max abs difference {max_diff:.3g}"))
    else:
        lines.append(f"weights: not compared (checkpointed blocks {sorted(rw)} vs {sorted(gw)})")
    bitwise = acc_equal and loss_equal and ens_equal and weights_equal is not False
    if bitwise:
        verdict, ok = "equal bit for bit" + ("" if weights_equal else " (accuracies and printed losses)"), True
    elif acc_close and loss_close:
        verdict, ok = (f"not bit for bit, within tolerance (test_acc within {ACC_TOL} per block, as "
                       f"tests/test_engine.py's NCCL test; final loss within {LOSS_REL_TOL:.0%})"), True
    else:
        verdict, ok = (f"DIFFERENT beyond tolerance (test_acc {ACC_TOL} per block, final loss "
                       f"{LOSS_REL_TOL:.0%})"), False
    lines += ["", f"**Verdict: {verdict}.**", ""]
    if args.context:
        lines += [args.context, ""]
    Path(args.md).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"NOTE: {gs['mode']} on {gs['world_size']} rank(s) vs {rs['mode']}: {verdict}", flush=True)
    return 0 if ok else 1


def _close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return abs(x - y) <= LOSS_REL_TOL * max(abs(x), abs(y)) + 1e-4


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


# ---------------------------------------------------------------------------------------------- the page
def render(args) -> int:
    steps = [json.loads(ln) for ln in Path(args.steps).read_text().splitlines() if ln.strip()] \
        if Path(args.steps).exists() else []
    failed = [s for s in steps if s["status"] == "fail"]
    out = [Path(args.header).read_text().rstrip(), ""] if args.header and Path(args.header).exists() else []
    verdict = "FAILED: " + ", ".join(s["id"] for s in failed) if failed else "no step failed"
    if args.running:
        verdict += " so far (the script is still running, or was stopped before its end)"
    count = {k: sum(s["status"] == k for s in steps) for k in ("pass", "skip")}
    out += [f"**{verdict}** ({count['pass']} passed, {len(failed)} failed, {count['skip']} skipped; "
            f"{sum(s['seconds'] for s in steps):.0f}s of steps)", "",
            "| step | result | wall s | limit s | what | note |", "|---|---|---:|---:|---|---|"]
    for s in steps:
        out.append(f"| {s['id']} | {s['status'].upper() if s['status'] == 'fail' else s['status']} | "
                   f"{s['seconds']:.1f} | {s['limit'] or '-'} | {_cell(s['what'])} | {_cell(s['note'])} |")
    sections = sorted(Path(args.sections).glob("*.md")) if args.sections else []
    for sec in sections:
        out += ["", sec.read_text().rstrip()]
    out += ["", "### Commands", ""]
    out += [f"- {s['id']}: `{s['command']}`" for s in steps if s["command"]]
    for s in failed:
        if s["log"]:
            out += ["", f"### {s['id']}: the log's last lines ({s['log']})", "", "```",
                    *_tail(Path(s["log"]), 25), "```"]
    Path(args.out).write_text("\n".join(out) + "\n")
    return 1 if failed else 0


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="script_summary.py")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("add")
    a.add_argument("steps")
    a.add_argument("--id", required=True)
    a.add_argument("--what", default="")
    a.add_argument("--rc", type=int, default=0)
    a.add_argument("--seconds", type=float, default=0.0)
    a.add_argument("--limit", type=int, default=0)
    a.add_argument("--log", default="")
    a.add_argument("--cmd", default="")
    a.add_argument("--status", choices=["pass", "fail", "skip"], help="given, not read from --rc and the log")
    a.add_argument("--note", default="")
    a.add_argument("--pytest", action="store_true", help="read the result from pytest's last line")
    j = sub.add_parser("run-job")
    j.add_argument("--dir", required=True)
    j.add_argument("--world", type=int, required=True)
    j.add_argument("--backend", default="")
    j.add_argument("--device", default="")
    j.add_argument("command", nargs=argparse.REMAINDER)
    c = sub.add_parser("compare")
    for k in ("ref", "got", "ref-log", "got-log", "md"):
        c.add_argument(f"--{k}", required=True)
    c.add_argument("--title", default="sync against simultaneous")
    c.add_argument("--context", default="")
    r = sub.add_parser("render")
    r.add_argument("steps")
    r.add_argument("--out", required=True)
    r.add_argument("--header")
    r.add_argument("--sections")
    r.add_argument("--running", action="store_true")
    args = p.parse_args(argv)
    if args.action == "run-job":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return {"add": add, "run-job": run_job, "compare": compare, "render": render}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
