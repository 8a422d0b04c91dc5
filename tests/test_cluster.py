"""Issue 30 item 1: the bench's launcher (a job's processes supervised as one) and its emulated nodes
(`decoupled bench --nodes N --link RATE`): flags refused before anything runs, the privilege error,
ranks spread over nodes, namespaces removed on every exit path and stale ones swept, and the
project's first real multi-node job: 2 nodes, one network namespace each, a shaped link between.

The namespace tests need root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2; elsewhere they skip with
the reason. .ci/run sets DECOUPLED_REQUIRE_NAMESPACES=1 when it runs as root: there a skip is a failure."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from decoupled.bench import cluster as cl
from decoupled.bench.launcher import Job, Local, Proc, run, using
from decoupled.cli import main
from decoupled.config import ConfigError

from torchrun_utils import MLP, REPO, assert_same_results, env, sets, summary, wait_for


def cluster_or_skip(nodes: int = 2) -> cl.Cluster:
    """An entered Cluster; a skip (a failure under .ci/run as root) where namespaces cannot be made."""
    try:
        return cl.Cluster(nodes).__enter__()
    except ConfigError as e:
        if os.environ.get("DECOUPLED_REQUIRE_NAMESPACES") == "1":
            pytest.fail(f"namespaces could not be made, and .ci/run runs as root: {e}")
        pytest.skip(f"namespaces cannot be made here: {e}")


@pytest.fixture
def nodes2():
    """An entered 2-node Cluster, removed afterwards."""
    c = cluster_or_skip()
    try:
        yield c
    finally:
        c.remove()


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Pair:
    """Two processes as one job: a sleeper that starts a grandchild in a session of its own (as
    torchrun's workers are) and a second process that exits with `code` once both are up."""

    def __init__(self, tmp, code: int):
        self.tmp, self.code = tmp, code

    def render(self, job: Job) -> list[Proc]:
        pids = self.tmp / "pids"
        sleeper = (f"import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; "
                   f"time.sleep(300)'], start_new_session=True); open({str(pids)!r}, 'w').write(f'{{g.pid}}'); "
                   "time.sleep(300)")
        second = (f"import os, sys, time\nwhile not os.path.exists({str(pids)!r}): time.sleep(0.05)\n"
                  f"time.sleep(0.2)\nsys.exit({self.code})" if self.code else "import time; time.sleep(300)")
        return [Proc([sys.executable, "-c", sleeper], {}), Proc([sys.executable, "-c", second], {"X": "1"}, "other")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", [3, 0], ids=["a-process-fails", "timeout"])
def test_run_stops_every_process_and_what_it_started(tmp_path, code):
    """The first failure (or the timeout) stops the whole job: the other process and the grandchild
    it started in its own session; each process kept its own log, its command line first."""
    log = tmp_path / "logs" / "job.log"
    with using(Pair(tmp_path, code)):
        err = run(Job(["unused"]), log, timeout=60 if code else 10)
    assert err is not None and (f"other: exit code {code}" in err if code else "timed out after 10s" in err), err
    grandchild = int((tmp_path / "pids").read_text())
    wait_for(lambda: not _alive(grandchild), 30, "the grandchild to be gone")
    assert log.read_text().startswith(sys.executable)
    assert (tmp_path / "logs" / "job.other.log").read_text().startswith("X=1 ")


def test_local_renders_what_decoupled_train_launches():
    from decoupled.launch import torchrun_command
    (p,) = Local().render(Job(["decoupled", "train"], 2))
    assert p.argv == torchrun_command(2, ["decoupled", "train"]) and "--standalone" in p.argv
    (p,) = Local().render(Job(["decoupled.bench.stages", "x"]))
    assert p.argv == [sys.executable, "-m", "decoupled.bench.stages", "x"]


def test_ranks_spread_over_nodes_with_one_agent_each():
    assert cl.spread(4, 2) == [2, 2] and cl.spread(3, 2) == [2, 1] and cl.spread(1, 3) == [1]
    fake = cl.Cluster(3)  # never entered: its names only
    record = {"link": "100mbit"}
    procs = cl.Nodes(fake, record).render(Job(["decoupled", "train"], 5))
    assert [p.name for p in procs] == ["", "node1", "node2"]
    for i, (p, k) in enumerate(zip(procs, [2, 2, 1])):
        assert p.argv[:4] == ["ip", "netns", "exec", fake.ns[i]]
        assert {"--nnodes=3", f"--node-rank={i}", "--master-addr=127.77.0.1", f"--nproc-per-node={k}"} <= set(p.argv)
        assert p.env["GLOO_SOCKET_IFNAME"] == p.env["NCCL_SOCKET_IFNAME"] == cl.IFACE
    assert len({p.env["NCCL_HOSTID"] for p in procs}) == 3  # NCCL may not take two nodes for one host
    # one process has no link to cross: it runs here, as without --nodes
    assert cl.Nodes(fake, record).render(Job(["decoupled", "train"])) == Local().render(Job(["decoupled", "train"]))


def test_link_rates_and_tbf_bursts():
    assert cl.parse_links("loopback,1gbit,100mbit") == ["loopback", "1gbit", "100mbit"]
    for bad in ("100mb", "fast", "1gbit,1gbit", ""):
        with pytest.raises(ConfigError, match="--link"):
            cl.parse_links(bad)
    # tbf refills once a kernel tick: its burst holds at least rate / HZ at the lowest HZ
    assert cl.burst_bytes("1gbit") >= 1e9 / 8 / cl.HZ_MIN > cl.burst_bytes("100mbit") >= 1e8 / 8 / cl.HZ_MIN


@pytest.mark.parametrize("argv, says", [
    (["--link", "100mbit"], "add --nodes"),
    (["--nodes", "1"], "at least 2"),
    (["--nodes", "2", "--link", "100mb"], "--link '100mb'"),
    (["--nodes", "3", "--ranks", "2"], "--ranks >= 3"),
    (["--nodes", "2", "--guard"], "drop --nodes"),
])
def test_nodes_and_link_refused_before_anything_runs(tmp_path, capsys, argv, says):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_privileges_is_one_line_naming_them_and_the_real_machines_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cl, "missing", lambda: ["CAP_NET_ADMIN", "the tc command"])
    assert main(["bench", "--nodes", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CAP_NET_ADMIN, the tc command" in err
    assert "torchrun --nnodes N --node-rank I --master-addr NODE0" in err and "GLOO_SOCKET_IFNAME" in err


@pytest.mark.timeout(120)
def test_stale_namespaces_of_dead_benches_go_and_no_other(nodes2):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [f"{cl.PREFIX}-{dead.pid}-0-n0", f"{cl.PREFIX}x-{dead.pid}-0-n0", f"{cl.PREFIX}-{os.getpid()}-77-n0"]
    try:
        for n in names:
            cl.sh("ip", "netns", "add", n)
        cl.reap_stale()  # (a bench starting beside this test may sweep it first: the same outcome)
        left = cl.namespaces()
        assert names[0] not in left and set(names[1:]) <= set(left)
        assert set(nodes2.ns) <= set(left)  # a live bench's own: untouched
    finally:
        for n in names[1:]:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, None], ids=["sigterm", "ctrl-c", "error"])
def test_namespaces_removed_on_every_exit_path(nodes2, sig):
    """A bench interrupted (SIGTERM, Ctrl-C) or failing inside the cluster leaves no namespace behind."""
    # the child waits on its stdin, in the cluster: a signal ends the wait, or a line makes it fail
    code = ("import sys\nfrom decoupled.bench.cluster import Cluster\nfrom decoupled.bench.launcher import "
            "signals_exit\nwith signals_exit(), Cluster(2):\n    print('up', flush=True)\n    sys.stdin.readline()\n"
            "    raise RuntimeError('a row failed')\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up", p.stderr.read()
        ours = [n for n in cl.namespaces() if n.startswith(f"{cl.PREFIX}-{p.pid}-")]
        assert len(ours) == 3  # two nodes and the hub
        if sig:
            p.send_signal(sig)
        else:
            p.stdin.write("fail\n")
            p.stdin.flush()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0
    assert not [n for n in cl.namespaces() if n.startswith(f"{cl.PREFIX}-{p.pid}-")]


@pytest.mark.torchrun
@pytest.mark.timeout(300)
def test_two_nodes_train_sync_across_a_shaped_link(nodes2, tmp_path, shared_reference):
    """The first real multi-node test: one torchrun agent in each node's namespace, static rendezvous
    on node 0's address, gloo bound to the veth shaped to 100mbit. The job trains as the single-process
    reference does, bit for bit, and its activations crossed the veth: node 0's TX counter grew by at
    least what rank 0 sent."""
    _, ref = shared_reference(MLP)
    nodes2.shape("100mbit")
    record = {"nodes": 2, **nodes2.measure(1.0)}
    assert record["tcp_bytes_per_s"] <= 1.1 * cl.rate_bytes("100mbit")  # shaped (load can only lower it)
    before = nodes2.tx_bytes()
    out = tmp_path / "run"
    with using(cl.Nodes(nodes2, record)):
        err = run(Job(["decoupled", "train", "--out", str(out), *sets({**MLP, "train.mode": "sync"})], 2),
                  tmp_path / "train.log", timeout=240)
    assert err is None, err
    got = summary(out)
    assert got["world_size"] == 2
    assert_same_results(ref, got)
    sent = [b - a for a, b in zip(before, nodes2.tx_bytes())]
    rank0 = next(r for r in got["ranks"] if r["rank"] == 0)
    assert sent[0] >= rank0["bytes_sent"] > 0, (sent, rank0["bytes_sent"])
    assert (tmp_path / "train.node1.log").read_text().startswith("GLOO_SOCKET_IFNAME=")


# 2 blocks of one conv each on 3x8x8 blobs (test_bench.py's TINY): seconds per row
TINY = {"data.name": "synthetic", "data.synthetic_shape": [3, 8, 8], "data.synthetic_train": 128,
        "data.synthetic_test": 32, "data.batch_size": 32, "model.name": "vgg", "model.hierarchy": [1, 1],
        "model.width": 4, "train.device": "cpu"}


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_runs_its_rows_on_every_link_and_goes_on_where_it_stopped(tmp_path):
    """decoupled bench --nodes 2 --link loopback,100mbit: every rate measured with a raw TCP stream
    before the rows, each link's rows in OUT/<link> with the link and the bytes each node sent, the
    sweep's page; the same command again reads every finished row back."""
    cluster_or_skip().remove()
    out = tmp_path / "links"
    cmd = [sys.executable, "-m", "decoupled", "bench", "--nodes", "2", "--link", "loopback,100mbit", "--rows", "sync",
           "--repeats", "1", "--timeout", "200", "--out", str(out), *sets(TINY)]
    for attempt in (0, 1):
        p = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = p.communicate(timeout=500)
        finally:
            p.kill()
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert not [n for n in cl.namespaces() if cl.owner(n) == p.pid]  # its namespaces went with it
        links = json.loads((out / "cluster.json").read_text())["links"]
        assert [r["link"] for r in links] == ["loopback", "100mbit"]
        assert links[1]["tcp_bytes_per_s"] <= 1.1 * cl.rate_bytes("100mbit") and links[0]["tcp_bytes_per_s"] > 0
        for link in ("loopback", "100mbit"):
            res = json.loads((out / link / "bench.json").read_text())
            (row,) = res["rows"]
            assert res["cluster"]["link"] == row["link"] == link and "error" not in row
            assert bool(row.get("reused")) == bool(attempt)
            if not attempt:  # node 0's rank sent the activations across its link, at most at the link's rate
                assert row["link_tx_bytes"][0] > 0 and row["ranks"][0]["sent_bytes_per_s"] > 0
                assert link == "loopback" or row["link_share"] <= 1.1
        assert "| sync |" in (out / "cluster.md").read_text()


def test_ci_fails_a_skipped_namespace_test_as_root():
    """.ci/run requires the namespace tests where it runs as root (see the module docstring)."""
    text = (REPO / ".ci" / "run").read_text()
    assert "DECOUPLED_REQUIRE_NAMESPACES=1" in text and "id -u" in text
