"""`decoupled bench --nodes N --link RATE[,RATE...]`: N emulated nodes on this machine, each a network
namespace, their links shaped to RATE, and the launcher that runs a job's ranks across them.

Note [emulated cluster]. A hub namespace holds a bridge; each node's namespace holds one end of a
veth pair (IFACE, address 127.77.0.<node+1>/24), whose other end is a port of the bridge. tbf shapes
the egress of both ends of every pair (the node's end: what the node sends; the hub's port: what it
receives), so each node has RATE up and RATE down, full duplex, as behind a non-blocking switch, for
any N: one topology, so a 2-node job crosses the same hops as a 4-node one. "loopback" removes the
shaping and keeps the path. Bandwidth only: this kernel has no netem, so no latency and no loss.
  - Addresses are loopback-range (route_localnet=1 in each namespace), and only inside namespaces
    the bench creates, so nothing it adds can clash with a network of the machine.
  - Names are PREFIX-<pid>-<n>-<role>; a Cluster removes its namespaces (and with them their links)
    on every exit path (a failed row, Ctrl-C, SIGTERM, a timeout: cli.py turns SIGTERM into an
    exception). A SIGKILL cannot be trapped, so every start removes the namespaces of PREFIX whose
    pid is dead, and never any other.
  - Each rank's gloo (and NCCL) is bound to its node's IFACE and NCCL gets a host id per node, so no
    transport can find a shorter way (shared memory) between two nodes of this one machine.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError
from ..launch import node_flags, torchrun_command
from .launcher import Job, Local, Proc

PREFIX = "dlb"
MAX_NODES = 250  # addresses 127.77.0.1-250
IFACE = "dlb0"  # every node's interface (namespaces keep the names apart)
MASTER_PORT = 29400  # node 0's rendezvous: its own namespace's port, free while no other job runs there
STREAM_PORT = 29399
LOOPBACK = "loopback"
HZ_MIN = 100  # the lowest kernel tick rate: tbf refills once a tick, so its burst must hold rate / HZ
MIN_BURST = 256 * 1024  # and at least a few 64 KiB GSO packets (256 KiB: 100mbit carried 11.95 MB/s here)
LATENCY_MS = 200  # tbf's queue, as time at RATE
_SEQ = itertools.count()
# what to run on real machines instead: the same rows, one torchrun agent per machine
REAL = ("on real machines run the same rows with one torchrun agent per machine: torchrun --nnodes N "
        "--node-rank I --master-addr NODE0 --master-port 29400 --nproc-per-node K/N -m decoupled train ... with "
        "GLOO_SOCKET_IFNAME=<the NIC> (docs/benchmarking.md, Emulated nodes)")


def parse_links(text: str) -> list[str]:
    """--link: comma-separated tc rates (e.g. 100mbit, 1gbit, 500kbit) or "loopback" (unshaped)."""
    links = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in links if v != LOOPBACK and not re.fullmatch(r"\d+(\.\d+)?(kbit|mbit|gbit)", v)]
    if bad or not links or len(set(links)) != len(links):
        raise ConfigError(f"bench --link {text!r}: expected distinct rates like 100mbit, 1gbit or 500kbit, or "
                          "loopback (the same path, unshaped), comma-separated; e.g. --link loopback,1gbit,100mbit")
    return links


def rate_bytes(link: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", link).groups()
    return float(number) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit] / 8


def burst_bytes(link: str) -> int:
    return max(int(rate_bytes(link) / HZ_MIN), MIN_BURST)


def missing() -> list[str]:
    """What emulating nodes needs and this process lacks: the capabilities and the commands."""
    caps = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    lacks = [name for name, bit in (("CAP_SYS_ADMIN", 21), ("CAP_NET_ADMIN", 12)) if not caps >> bit & 1]
    return lacks + [f"the {tool} command" for tool in ("ip", "tc", "sysctl") if shutil.which(tool) is None]


def sh(*argv: str, ns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode:
        raise ConfigError(f"bench --nodes: `{' '.join(cmd)}` failed: {p.stderr.strip() or p.returncode}; {REAL}")
    return p.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def owner(name: str) -> int | None:
    """The pid in a name of the bench's own (PREFIX-<pid>-...), else None: not ours."""
    m = re.fullmatch(rf"{PREFIX}-(\d+)-\d+-\w+", name)
    return int(m.group(1)) if m else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Remove the namespaces of PREFIX whose owning bench is dead (it was SIGKILLed); the names removed."""
    stale = [n for n in namespaces() if owner(n) is not None and not alive(owner(n))]
    for n in stale:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=60)
    return stale


class Cluster:
    """N nodes in namespaces (Note [emulated cluster]); a context manager: made on entry (after the
    privilege check and the stale sweep), removed on exit whatever ended it."""

    def __init__(self, nodes: int):
        self.nodes = nodes
        self.name = f"{PREFIX}-{os.getpid()}-{next(_SEQ)}"
        self.hub = f"{self.name}-hub"
        self.ns = [f"{self.name}-n{i}" for i in range(nodes)]
        self.made: list[str] = []
        self.link: str | None = None  # the shaping in force

    @staticmethod
    def addr(node: int) -> str:
        return f"127.77.0.{node + 1}"

    def __enter__(self) -> Cluster:
        lacks = missing()
        if lacks:
            raise ConfigError(f"bench --nodes {self.nodes}: emulating nodes needs {', '.join(lacks)} (run as root, "
                              f"with iproute2); {REAL}")
        reap_stale()
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _build(self) -> None:
        self._add(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns):
            self._add(ns)
            sh("ip", "link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.hub)
            sh("ip", "-n", self.hub, "link", "set", f"p{i}", "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", f"p{i}", "up")
            sh("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1", f"net.ipv4.conf.{IFACE}.route_localnet=1", ns=ns)
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFACE)
            sh("ip", "-n", ns, "link", "set", IFACE, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _add(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)

    def remove(self) -> None:
        """Delete every namespace made (its veth ends go with it); never raises."""
        while self.made:
            subprocess.run(["ip", "netns", "del", self.made.pop()], capture_output=True, timeout=60)

    def ends(self):
        """Every shaped egress: (namespace, device) for each node's end and each hub port."""
        for i, ns in enumerate(self.ns):
            yield ns, IFACE
            yield self.hub, f"p{i}"

    def shape(self, link: str) -> None:
        """Every link at `link` (tbf at both ends of each pair), or unshaped for "loopback"."""
        for ns, dev in self.ends():
            if link == LOOPBACK:
                if self.link not in (None, LOOPBACK):
                    sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns)
            else:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", link, "burst",
                   str(burst_bytes(link)), "latency", f"{LATENCY_MS}ms", ns=ns)
        self.link = link

    def tx_bytes(self) -> list[int]:
        """Bytes each node has sent on its link so far (the veth's TX counter)."""
        out = []
        for ns in self.ns:
            (dev,) = json.loads(sh("ip", "-n", ns, "-j", "-s", "link", "show", IFACE))
            out.append(int(dev["stats64"]["tx"]["bytes"]))
        return out

    def measure(self, seconds: float = 2.0) -> dict:
        """The link's rate as a raw TCP stream sees it: node 0 sends to node 1 for `seconds` (python
        sockets, tcpstream.py), measured at the receiver after its first quarter second (tbf's
        initial burst and TCP's slow start)."""
        py = [sys.executable, str(Path(__file__).with_name("tcpstream.py"))]  # by path: no package, no torch
        server = subprocess.Popen(["ip", "netns", "exec", self.ns[1], *py, "serve", self.addr(1), str(STREAM_PORT)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = server.stdout.readline()
            if ready.strip() != "ready":
                raise ConfigError(f"bench --nodes: the TCP stream's receiver did not start: {server.stderr.read()}")
            sh(*py, "send", self.addr(1), str(STREAM_PORT), str(seconds), ns=self.ns[0])
            out, err = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        if server.returncode:
            raise ConfigError(f"bench --nodes: the TCP stream's receiver failed: {err.strip()}")
        got = json.loads(out)
        if not got["bytes_per_s"]:
            raise ConfigError(f"bench --nodes: the TCP stream over link {self.link} carried nothing measurable: {got}")
        return {"link": self.link, "tcp_bytes_per_s": got["bytes_per_s"], "tcp_bytes": got["bytes"],
                "tcp_seconds": got["seconds"],
                **({} if self.link == LOOPBACK else {"rate_bytes_per_s": rate_bytes(self.link),
                                                     "burst_bytes": burst_bytes(self.link),
                                                     "tbf_latency_ms": LATENCY_MS})}


def spread(nproc: int, nodes: int) -> list[int]:
    """nproc ranks over at most `nodes` nodes, evenly and in order (node 0 takes ranks 0...; the
    first nodes take one more where they do not divide): a pipeline crosses each node boundary once."""
    used = min(nproc, nodes)
    q, r = divmod(nproc, used)
    return [q + (i < r) for i in range(used)]


class Nodes:
    """Jobs across a Cluster's nodes: one torchrun agent per node that holds ranks, inside its
    namespace, with static rendezvous on node 0's address. A one-process job has no link to cross:
    it runs here (Local), as without --nodes."""

    def __init__(self, cluster: Cluster, record: dict):
        self.cluster, self.record = cluster, record
        self.link = record["link"]
        self.where = {"nodes": cluster.nodes, "link": self.link}
        self.tx_bytes = cluster.tx_bytes

    def render(self, job: Job) -> list[Proc]:
        if not job.nproc:
            return Local().render(job)
        c = self.cluster
        counts = spread(job.nproc, c.nodes)
        return [Proc(["ip", "netns", "exec", c.ns[i],
                      *torchrun_command(k, job.module_args, node_flags(len(counts), i, c.addr(0), MASTER_PORT))],
                     {"GLOO_SOCKET_IFNAME": IFACE, "NCCL_SOCKET_IFNAME": IFACE, "NCCL_HOSTID": f"{c.name}-node{i}"},
                     "" if i == 0 else f"node{i}")
                for i, k in enumerate(counts)]
