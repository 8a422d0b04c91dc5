"""`decoupled report --regime` (decoupled/report/regime.py) on hand-made bench outputs: no torchrun, no
training; the folders have the layout and fields `decoupled bench --nodes N --link ...` writes."""
import json

from decoupled.cli import main as cli_main

MiB = 2 ** 20
CONFIG = '[data]\nname = "fashion-mnist"\nbatch_size = 64\n\n[model]\nname = "mlp"\nwidths = [1024, 1024, 1024, 1024]\n'
TCP = {"loopback": 1.5e9, "1gbit": 119.5e6, "100mbit": 11.95e6}


def curve(*accs, every=40):
    return [{"step": every * (i + 1), "train_s": 2.0 * (i + 1), "test_acc": a, "epoch": round((i + 1) / 5, 4)}
            for i, a in enumerate(accs)]


def row(mode, accs=None, sps=900.0, **extra):
    """A bench row; with `accs`, a --curve row (its curve, final accuracy, measured time to 0.80)."""
    r = {"mode": mode, "samples_per_s": sps, "wire_bytes_per_sample": None,
         "ranks": [{"rank": 0, "exact_train_mem_bytes": 10 * MiB}, {"rank": 1, "exact_train_mem_bytes": 12 * MiB}]}
    if mode.startswith(("sync", "async")):
        r["wire_bytes_per_sample"] = 4116.0
    else:
        r["comm_bytes_per_sample"] = 90000.0
    if accs:
        c = curve(*accs)
        r.update(curve=c, final_acc=c[-1]["test_acc"], time_to_target_s=next(
            (p["train_s"] for p in c if p["test_acc"] >= 0.80), None))
    return {**r, **extra}


def bench(folder, link, rows, target=None, batch=64):
    """OUT/<link>/bench.json (and the config.toml the bench writes beside it)."""
    d = folder / link
    d.mkdir(parents=True)
    cluster = {"nodes": 2, "link": link, "tcp_bytes_per_s": TCP[link], "folder": link}
    if link != "loopback":
        cluster["rate_bytes_per_s"] = {"1gbit": 125e6, "100mbit": 12.5e6}[link]
    b = {"rows": rows, "batch_size": batch, "n_train": 12000, "cluster": cluster}
    if target is not None:
        b["curve"] = {"target_acc": target, "epochs": 2, "seeds": 1}
    (d / "bench.json").write_text(json.dumps(b))
    (d / "config.toml").write_text(CONFIG)


def network(tmp_path):
    """curves/ (loopback, every row's curve), probes/ (every link) and shaped/ (async at 100mbit)."""
    net = tmp_path / "mlp"
    bench(net / "curves", "loopback", [row("sync", (0.7, 0.81, 0.85)), row("ddp", (0.6, 0.75, 0.79)),
                                       row("async", (0.72, 0.82, 0.84))], target=0.80)
    for link, sps in (("loopback", 1000.0), ("1gbit", 800.0), ("100mbit", 320.0)):
        probes = [row("sync", sps=sps, link_share=0.5), row("async", sps=sps)]
        bench(net / "probes", link, probes + ([row("ddp", sps=sps / 10)] if link != "100mbit" else []))
    bench(net / "shaped", "100mbit", [row("async", (0.5, 0.78, 0.80), sps=300.0)], target=0.80)
    return net


def regime(tmp_path, *dirs):
    out = tmp_path / "map"
    assert cli_main(["report", "--regime", *map(str, dirs), "--out", str(out)]) == 0
    nets = json.loads((out / "regime.json").read_text())["networks"]
    cells = {(c["row"], c["link"]): c for n in nets for c in n["cells"]}
    return out, nets, cells


def test_computed_time_is_steps_times_batch_over_the_probe(tmp_path):
    out, nets, cells = regime(tmp_path, network(tmp_path))
    assert nets[0]["network"] == "mlp 4x1024 on fashion-mnist"
    assert [rec["link"] for rec in nets[0]["links"]] == ["loopback", "1gbit", "100mbit"]  # by measured rate
    c = cells["sync", "100mbit"]
    assert (c["how"], c["steps_to_target"]) == ("computed", 80)
    assert c["time_to_target_s"] == 80 * 64 / 320.0
    assert c["samples_per_s"] == 320.0 and c["link_share"] == 0.5 and c["tcp_bytes_per_s"] == 11.95e6
    assert c["final_acc"] == 0.85 and c["train_mem_mib"] == 12.0 and c["bytes_per_sample"] == 4116.0
    assert cells["ddp", "1gbit"]["bytes_per_sample"] == 90000.0  # data-parallel: the all-reduces' bytes
    page = (out / "regime.md").read_text()
    assert "| sync | 4.0 (measured) | 6.4 (computed) | 16.0 (computed) |" in page
    assert "![regime map](regime.png)" in page


def test_measured_is_preferred_over_computed(tmp_path):
    _, _, cells = regime(tmp_path, network(tmp_path))
    c = cells["async", "100mbit"]  # a curve there (shaped/) and a probe: the curve's own time
    assert (c["how"], c["time_to_target_s"], c["steps_to_target"], c["final_acc"]) == ("measured", 6.0, 120, 0.80)
    assert cells["async", "loopback"]["how"] == "measured" and cells["async", "1gbit"]["how"] == "computed"


def test_never_and_no_probe(tmp_path):
    out, _, cells = regime(tmp_path, network(tmp_path))
    c = cells["ddp", "1gbit"]  # its curve stays below 0.80: never, kept in the map
    assert (c["how"], c["time_to_target_s"], c["reached_target"]) == ("computed", None, False)
    assert cells["ddp", "loopback"]["reached_target"] is False
    c = cells["ddp", "100mbit"]  # no probe there: no time
    assert (c["how"], c["time_to_target_s"], c["reached_target"]) == (None, None, None)
    assert "| ddp | never (measured) | never (computed) | - |" in (out / "regime.md").read_text()


def test_seeds_take_the_median_step_a_seed_that_never_got_there_counting_as_never(tmp_path):
    net = tmp_path / "n"
    seeds = lambda *cs: [{"seed": i, "curve": curve(*c)} for i, c in enumerate(cs)]  # noqa: E731
    bench(net / "curves", "loopback", [row("sync", (0.7, 0.81), seeds=seeds((0.7, 0.81), (0.81, 0.9), (0.6, 0.7)),
                                           time_to_target_median_s=4.0, final_acc_mean=0.8),
                                       row("e2e", (0.7, 0.81), seeds=seeds((0.7, 0.81), (0.6, 0.7)),
                                           time_to_target_median_s=None, final_acc_mean=0.75)], target=0.80)
    bench(net / "probes", "1gbit", [row("sync", sps=640.0), row("e2e", sps=640.0)])
    _, _, cells = regime(tmp_path, net)
    assert cells["sync", "1gbit"]["time_to_target_s"] == 80 * 64 / 640.0  # steps 80, 40, never: median 80
    assert cells["sync", "loopback"]["final_acc"] == 0.8  # the seeds' mean
    assert cells["e2e", "1gbit"]["reached_target"] is False  # 80 and never: half is never


def test_figure_one_panel_per_network(tmp_path):
    vgg = network(tmp_path)
    for f in vgg.rglob("config.toml"):
        f.write_text('[data]\nname = "fashion-mnist"\n\n[model]\nname = "vgg"\nchannels = [32, 64, 128]\n')
    mlp = network(tmp_path / "two")
    out, nets, _ = regime(tmp_path, vgg, mlp)
    assert [n["network"] for n in nets] == ["vgg 32/64/128 on fashion-mnist", "mlp 4x1024 on fashion-mnist"]
    assert (out / "regime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_not_a_bench_output_is_one_line_naming_it(tmp_path, capsys):
    empty, plain = tmp_path / "empty", tmp_path / "plain"
    empty.mkdir()
    (plain / "x").mkdir(parents=True)
    (plain / "x" / "bench.json").write_text(json.dumps({"rows": [], "batch_size": 64}))  # no --nodes: no cluster
    missing = tmp_path / "missing"
    for bad, named in ((empty, empty), (plain, plain / "x" / "bench.json"), (missing, missing)):
        assert cli_main(["report", "--regime", str(network(tmp_path / f"ok-{bad.name}")), str(bad),
                         "--out", str(tmp_path / "map")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(named) in err, err
    (tmp_path / "ok-empty" / "mlp" / "curves" / "loopback" / "config.toml").unlink()  # the network's name
    assert cli_main(["report", "--regime", str(tmp_path / "ok-empty"), "--out", str(tmp_path / "map")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.toml" in err and str(tmp_path / "ok-empty") in err, err
    curves_only_shaped = tmp_path / "shaped-only"
    bench(curves_only_shaped, "100mbit", [row("sync", (0.81,))], target=0.80)
    assert cli_main(["report", "--regime", str(curves_only_shaped), "--out", str(tmp_path / "map")]) == 2
    assert "unshaped loopback" in capsys.readouterr().err
    assert not (tmp_path / "map").exists()  # nothing written on bad input


def test_report_takes_folders_or_regime_not_both(tmp_path, capsys):
    net = network(tmp_path)
    for argv in (["report"], ["report", str(net), "--regime", str(net)]):
        assert cli_main([*argv, "--out", str(tmp_path / "map")]) == 2
        assert "not both" in capsys.readouterr().err


def test_a_codec_row_is_compared_with_its_float32_row_seed_by_seed(tmp_path):
    """sync-int8 against sync on the seeds both ran (issue 30: paired seeds), not on their means."""
    def seeded(mode, finals):
        r = row(mode, (0.7, 0.81))
        r["seeds"] = [{"seed": s, "final_acc": a, "curve": r["curve"]} for s, a in finals]
        return r
    net = tmp_path / "mlp"
    bench(net / "curves", "loopback", [seeded("sync", [(0, 0.80), (1, 0.78), (2, 0.82)]),
                                       seeded("sync-int8", [(0, 0.79), (1, 0.78), (3, 0.90)]),
                                       row("ddp", (0.6, 0.75))], target=0.80)
    bench(net / "probes", "100mbit", [row("sync"), row("sync-int8")])
    out, nets, _ = regime(tmp_path, net)
    (p,) = nets[0]["paired"]
    assert (p["row"], p["against"], p["seeds"]) == ("sync-int8", "sync", [0, 1])
    assert [round(d, 6) for d in p["diffs"]] == [-0.01, 0.0] and round(p["mean"], 6) == -0.005
    assert "| sync-int8 | sync | 0, 1 | -1.00, +0.00 | -0.50 |" in (out / "regime.md").read_text()
