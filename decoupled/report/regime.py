"""`decoupled report --regime DIR [DIR...] --out OUT`: issue 30's regime map, time to a target accuracy
against link rate, from the bench outputs of one network per DIR (OUT/regime.md, regime.json, regime.png).

A DIR holds `decoupled bench --nodes N --link ...` outputs (each OUT/<link>/bench.json, found anywhere
under DIR): benches run with --curve (curves/ on the unshaped loopback link, shaped/ on shaped links)
and without it (probes/: each row's samples/s on each link). The full grid on slow links would take
hours (docs/benchmarking.md, The regime map), so a row's time to target on a link is
  - measured: the row's own curve on that link, where one ran there;
  - computed: the source steps to the first point of its unshaped curve at or above the target, times
    the probe's step time on that link (batch / samples_per_s). A lockstep row (e2e, sync, ddp, ...)
    does the same arithmetic at any link speed, so only its pace changes; async does not, which is
    why its curves run on every link.
The bench.json files are read as JSON (report imports nothing from bench): their fields are
bench/rows.py's, the cluster record bench/cluster.py's."""
from __future__ import annotations

import json
import statistics
import sys
import tomllib
from pathlib import Path

MiB = 2 ** 20


class RegimeError(ValueError):
    """A folder that is not what the map needs; its message is one line that names it."""


def read_bench(path: Path) -> dict:
    """A bench.json of `bench --nodes`: its rows, batch, and the link its rows ran on with its measured rate."""
    try:
        b = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegimeError(f"{path}: unreadable as a bench.json ({type(e).__name__}: {e})") from None
    c = b.get("cluster") if isinstance(b, dict) else None
    if not (isinstance(c, dict) and {"link", "tcp_bytes_per_s"} <= c.keys() and isinstance(b.get("rows"), list)
            and "batch_size" in b):
        raise RegimeError(f"{path}: not the output of `decoupled bench --nodes N --link ...` (it needs rows, "
                          "batch_size and the cluster record of the link)")
    return b


def network_name(config: Path) -> str:
    """The bench's model and its shape: 'mlp 4x1024 on fashion-mnist', 'vgg 32/64/128 on ...'."""
    cfg = tomllib.loads(config.read_text())
    m = cfg["model"]
    sizes = m.get("widths") or m.get("channels")
    if sizes:
        shape = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "/".join(map(str, sizes))
    else:  # vit and the like: a token width and a depth
        shape = " ".join(f"{k} {m[k]}" for k in ("width", "depth") if k in m)
    return " ".join(p for p in (m["name"], shape, "on", cfg["data"]["name"]) if p)


def steps_to_target(row: dict, target: float) -> float | None:
    """Source steps to the first point at or above `target`: the median over the row's seeds, a seed
    that never got there counting as never (as the bench's median time to target does); None: never."""
    curves = [s.get("curve") for s in row["seeds"]] if row.get("seeds") else [row.get("curve")]
    steps = [next((p["step"] for p in c or [] if p["test_acc"] >= target), float("inf")) for c in curves]
    m = statistics.median(steps)
    return None if m == float("inf") else m


def measured_time(row: dict) -> float | None:
    return row.get("time_to_target_median_s") if row.get("seeds") else row.get("time_to_target_s")


def _index(benches: list[tuple[Path, dict]], what: str) -> dict[tuple[str, str], dict]:
    """(row, link) -> the bench row; a pair two benches both ran is an error, not a silent choice."""
    out, where = {}, {}
    for path, b in benches:
        for row in b["rows"]:
            key = (row["mode"], b["cluster"]["link"])
            if key in out:
                raise RegimeError(f"{path}: {what} of row {key[0]} on link {key[1]} is also in {where[key]}")
            out[key], where[key] = row, path
    return out


def network(d: Path) -> dict:
    """One network's map: its links (measured TCP rates) and a cell per (row, link)."""
    if not d.is_dir():
        raise RegimeError(f"{d}: no such folder")
    paths = sorted(d.rglob("bench.json"))
    if not paths:
        raise RegimeError(f"{d}: no bench.json under it: not the output of `decoupled bench --nodes N --link ...`")
    benches = [(p, read_bench(p)) for p in paths]
    curved = [(p, b) for p, b in benches if b.get("curve")]
    unshaped = [(p, b) for p, b in curved if "rate_bytes_per_s" not in b["cluster"]]  # loopback: no tbf rate
    if not unshaped:
        raise RegimeError(f"{d}: no `bench --curve` output on the unshaped loopback link (curves/): the computed "
                          "times need every row's unshaped curve")
    targets = {b["curve"].get("target_acc") for _, b in curved}
    batches = {b["batch_size"] for _, b in benches}
    if len(targets) != 1 or None in targets or len(batches) != 1:
        raise RegimeError(f"{d}: its benches must share one --target-acc and one batch size (got targets "
                          f"{sorted(targets, key=str)}, batches {sorted(batches)})")
    target, batch = targets.pop(), batches.pop()
    curves = _index(curved, "a curve")
    probes = _index([(p, b) for p, b in benches if not b.get("curve")], "a probe")
    base = unshaped[0][1]["cluster"]["link"]
    links: dict[str, dict] = {}
    for p, b in benches:
        c = b["cluster"]
        rec = links.setdefault(c["link"], {"link": c["link"], "rate_bytes_per_s": c.get("rate_bytes_per_s"),
                                            "measurements": []})
        rec["measurements"].append({"folder": str(p.parent), "tcp_bytes_per_s": c["tcp_bytes_per_s"]})
    for rec in links.values():  # every bench measured its link before its rows: their median places it
        rec["tcp_bytes_per_s"] = statistics.median(m["tcp_bytes_per_s"] for m in rec["measurements"])
    order = sorted(links, key=lambda k: -links[k]["tcp_bytes_per_s"])
    rows = list(dict.fromkeys([m for m, _ in curves] + [m for m, _ in probes]))
    cells = [{**cell(m, k, curves, probes, base, target, batch), "tcp_bytes_per_s": links[k]["tcp_bytes_per_s"]}
             for m in rows for k in order]
    return {"network": network_name(unshaped[0][0].parent / "config.toml"), "folder": str(d), "target_acc": target,
            "batch_size": batch, "rows": rows, "links": [links[k] for k in order], "cells": cells,
            "paired": paired(curves, base)}


def cell(mode: str, link: str, curves: dict, probes: dict, base: str, target: float, batch: int) -> dict:
    """One (row, link): the time to target and how it was had, and the figures beside it. Accuracy, bytes
    and memory come from the curve the time came from (the unshaped one for a computed time)."""
    here, unshaped, probe = curves.get((mode, link)), curves.get((mode, base)), probes.get((mode, link))
    sps = (probe or {}).get("samples_per_s")
    how, time, steps = None, None, None
    if here and here.get("curve"):
        how, time, steps = "measured", measured_time(here), steps_to_target(here, target)
    elif unshaped and unshaped.get("curve") and sps:
        steps = steps_to_target(unshaped, target)
        how, time = "computed", None if steps is None else steps * batch / sps
    src = next((r for r in (here, unshaped, probe) if r and (r.get("curve") or r.get("samples_per_s"))), {})
    wire = src.get("wire_bytes_per_sample")  # decoupled rows: activations; data-parallel rows: all-reduces
    mem = [r["exact_train_mem_bytes"] for r in src.get("ranks", []) if r.get("exact_train_mem_bytes") is not None]
    return {"row": mode, "link": link, "how": how, "time_to_target_s": time, "steps_to_target": steps,
            "reached_target": None if how is None else time is not None,
            "samples_per_s": sps, "link_share": (probe or {}).get("link_share"),
            "final_acc": src.get("final_acc_mean") if src.get("seeds") else src.get("final_acc"),
            "bytes_per_sample": wire if wire is not None else src.get("comm_bytes_per_sample"),
            "train_mem_mib": max(mem) / MiB if mem else None}


def paired(curves: dict, base: str) -> list[dict]:
    """Each variant row against its base row (`sync-int8` against `sync` on the float32 wire, `ddp-powersgd`
    against `ddp`), seed by seed on the unshaped curves: the same seed gives both the same initial weights
    and data order, so their difference is the variant's alone (issue 30: 0.2 point is below the spread of
    unpaired seeds)."""
    out = []
    for (mode, link), row in sorted(curves.items()):
        plain = mode.rsplit("-", 1)[0] if "-" in mode else None
        ref = curves.get((plain, link)) if link == base and plain else None
        if ref is None:
            continue
        finals = [{s["seed"]: s["final_acc"] for s in (r.get("seeds") or [r]) if s.get("final_acc") is not None}
                  for r in (row, ref)]
        seeds = sorted(set(finals[0]) & set(finals[1]))
        if not seeds:
            continue
        diffs = [finals[0][s] - finals[1][s] for s in seeds]
        out.append({"row": mode, "against": plain, "seeds": seeds, "diffs": diffs,
                    "mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else None})
    return out


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _time(c: dict) -> str:
    """The time as the page shows it: seconds, "never" (the curve never reached the target), "-" (no curve
    on the link and no probe there to compute one from)."""
    return "-" if c["how"] is None else "never" if c["time_to_target_s"] is None else f"{c['time_to_target_s']:.1f}"


def section(net: dict) -> list[str]:
    links = [rec["link"] for rec in net["links"]]
    lines = [f"## {net['network']}", "", f"Target test accuracy {net['target_acc']}, batch {net['batch_size']}; "
             f"bench outputs under `{net['folder']}`.", "",
             "| link | tbf rate MB/s | raw TCP stream MB/s (median) | measured by |", "|---|---:|---:|---|"]
    for rec in net["links"]:
        rate = "unshaped" if rec["rate_bytes_per_s"] is None else f"{rec['rate_bytes_per_s'] / 1e6:.2f}"
        lines.append(f"| {rec['link']} | {rate} | "
                     f"{rec['tcp_bytes_per_s'] / 1e6:.2f} | " + ", ".join(
                         f"`{m['folder']}` {m['tcp_bytes_per_s'] / 1e6:.2f}" for m in rec["measurements"]) + " |")
    lines += ["", "Time to target (s):", "", "| row | " + " | ".join(links) + " |", "|---|" + "---:|" * len(links)]
    for row in net["rows"]:
        cs = [c for c in net["cells"] if c["row"] == row]
        lines.append(f"| {row} | " + " | ".join(_time(c) + (f" ({c['how']})" if c["how"] else "") for c in cs) + " |")
    lines += ["", "| row | link | time to target s | how | steps to target | samples/s (probe) | link share | "
              "final acc. | bytes/sample | exact train mem. MiB/rank | link TCP MB/s |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in net["cells"]:
        lines.append(f"| {c['row']} | {c['link']} | {_time(c)} | {c['how'] or '-'} | {_f(c['steps_to_target'], 'g')} | "
                     f"{_f(c['samples_per_s'], '.1f')} | {_f(c['link_share'], '.2f')} | {_f(c['final_acc'], '.4f')} | "
                     f"{_f(c['bytes_per_sample'], '.0f')} | {_f(c['train_mem_mib'], '.1f')} | "
                     f"{c['tcp_bytes_per_s'] / 1e6:.2f} |")
    if net.get("paired"):
        lines += ["", "Final accuracy on paired seeds (the unshaped curves; the same seed, so the same initial weights "
                  "and data order):", "", "| row | against | seeds | difference per seed (points) | mean | std |",
                  "|---|---|---|---|---:|---:|"]
        for p in net["paired"]:
            std = "-" if p["std"] is None else f"{100 * p['std']:.2f}"
            lines.append(f"| {p['row']} | {p['against']} | {', '.join(map(str, p['seeds']))} | "
                         + ", ".join(f"{100 * d:+.2f}" for d in p["diffs"]) + f" | {100 * p['mean']:+.2f} | {std} |")
    return lines + [""]


def markdown(networks: list[dict], figure: Path) -> str:
    lines = ["# The regime map", "",
             "Time to the target accuracy against the link's rate, one panel per network and one line per row. "
             "**measured**: the row's own curve on that link (filled points); **computed**: the source steps to "
             "the target on the row's unshaped (loopback) curve x batch / the probe's samples/s on that link "
             "(hollow points), which holds for a row that does the same arithmetic at any link speed (every "
             "lockstep row), not for async. \"never\": the curve did not reach the target (left out of the "
             "figure); \"-\": no curve on that link and no probe there. Accuracy, bytes per sample and memory "
             "come from the curve the time came from; samples/s and link share from the probe. Bandwidth "
             "only: the links have no added latency and no loss.", "", f"![regime map]({figure.name})", ""]
    for net in networks:
        lines += section(net)
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"decoupled: report --regime: {message}", file=sys.stderr)
    return 2


def main(dirs: list[Path], out: Path) -> int:
    """The map of `dirs` (one network each) into OUT; 2 with one line naming the folder that is not a
    bench output."""
    from .plots import regime_map
    networks = []
    for d in dirs:
        try:
            networks.append(network(d))
        except RegimeError as e:
            return _fail(str(e))
        except (OSError, KeyError, TypeError, ValueError) as e:  # a file or field the bench writes is missing
            return _fail(f"{d}: not a bench output as `decoupled bench` writes it ({type(e).__name__}: {e})")
    names = [n["network"] for n in networks]
    if len(set(names)) != len(names):  # two folders of one network would draw one panel twice
        for n in networks:
            n["network"] += f" ({Path(n['folder']).name})"
    out.mkdir(parents=True, exist_ok=True)
    (out / "regime.json").write_text(json.dumps({"networks": networks}, indent=2))
    figure = regime_map(networks, out / "regime.png")
    (out / "regime.md").write_text(markdown(networks, figure))
    print(f"report --regime: {len(networks)} network(s) -> {out / 'regime.md'}, regime.json, regime.png")
    return 0
