"""A real two-node SLURM cluster on the machine the tests run on.

`slurmctld` runs in the root network namespace; each compute node is a `slurmd` in its own
network namespace (own address on a private bridge, own hostname via a UTS namespace, own /tmp
via a mount namespace), so jobs
really span two hosts as far as SLURM, srun and TCP rendezvous are concerned. A private `munged`
(own key and socket), the configuration, spool, state and logs all live under one temp dir.
Everything is undone by `SlurmCluster.stop()`, which the pytest fixture calls as a finalizer and
`atexit` calls again if the process exits some other way.

The layout follows ../shared/notes/slurm.md (what was seen working on this machine): `nsenter
--net` rather than `ip netns exec` (the latter remounts /sys and slurmd loses its cgroup mount),
explicit deletion of the host end of each veth, and reading /proc state rather than `kill -0`
when waiting for a daemon to stop (there is no init to reap forked children).

Debug by hand: `python -m tests.integration.slurm_cluster` starts a cluster, prints the
`SLURM_CONF` to export, and stops it on Enter.
"""
from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)

HOSTS_FILE = Path("/etc/hosts")
# /24 subnets are taken from 10.200.0.0/16 and exist only on the bridge this module creates;
# the cluster sends nothing beyond that bridge.
SUBNET_POOL = ipaddress.ip_network("10.200.0.0/16")
TERMINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT",
}
REQUIRED_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "srun",
                     "ip", "nsenter", "unshare")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the cluster (not root, no namespaces, SLURM missing)."""


def unavailable_reason() -> str | None:
    """Why a cluster cannot start here, or None. Only environment checks, no side effects."""
    if os.geteuid() != 0:
        return "the SLURM cluster tests need root (network namespaces, slurmd as root)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return (f"missing {', '.join(missing)}: install Debian slurm-wlm, munge and iproute2 "
                "(scripts/setup.sh does)")
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network/UTS/mount namespaces unavailable: {probe.stderr.strip() or probe.returncode}"
    return None


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _proc_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (kill -0 succeeds on zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


STATE_FILE = "cluster.json"


def remove_stale_clusters(base: str = "/var/tmp") -> None:
    """Undo clusters whose test process died without cleaning up (SIGKILL, CI timeout)."""
    for state_path in Path(base).glob(f"slurm-ci-*/{STATE_FILE}"):
        try:
            st = json.loads(state_path.read_text())
        except (OSError, ValueError):
            continue
        if _proc_alive(st.get("owner_pid", -1)):
            continue  # a live cluster of another test process
        log.warning("removing stale SLURM test cluster %s", state_path.parent)
        for pid in st.get("pids", []):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if any(d in cmd for d in (b"slurmd", b"slurmctld", b"munged")) and str(state_path.parent).encode() in cmd:
                os.kill(pid, signal.SIGKILL)
        for ns in st.get("netns", []):
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
        for link in st.get("veths", []) + [st.get("bridge")]:
            if link:
                _run(["ip", "link", "del", link], check=False)
        marker = st.get("hosts_marker")
        if marker:
            kept = [ln for ln in HOSTS_FILE.read_text().splitlines(keepends=True) if not ln.rstrip().endswith(marker)]
            with HOSTS_FILE.open("w") as f:
                f.writelines(kept)
        shutil.rmtree(state_path.parent, ignore_errors=True)


def _pick_subnet() -> ipaddress.IPv4Network:
    """First /24 of the pool that no interface on this machine uses (concurrent clusters)."""
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    used = [ipaddress.ip_address(a) for a in re.findall(r"inet (\S+?)/", out)]
    for net in SUBNET_POOL.subnets(new_prefix=24):
        if not any(a in net for a in used):
            return net
    raise RuntimeError(f"no free /24 left in {SUBNET_POOL}")


@dataclass
class Node:
    name: str
    addr: str
    netns: str
    veth: str
    proc: subprocess.Popen | None = None


@dataclass
class SlurmCluster:
    """Start with `start()`, stop with `stop()` (idempotent, safe after a partial start)."""

    n_nodes: int = 2
    # What each node declares: shaped like an 8-GPU node (2 sockets, 8 tasks x 8 CPUs, the
    # pretraining scripts' #SBATCH shape), far more than the machine has. `config_overrides`
    # makes slurmd register the declared shape instead of draining the node for it.
    sockets_per_node: int = 2
    cores_per_socket: int = 32
    gpus_per_node: int = 8
    features: str = "citest_gpu"
    real_memory_mb: int = 4000
    # task/none by default: every node is the same 2 real cores, so binding would pin the tasks
    # of both nodes onto the same core (core 0 of each node is real core 0). The 8-task test
    # asks for task/affinity to check the masks SLURM computes.
    task_plugin: str = "task/none"
    # How long a node may be silent before slurmctld marks it DOWN (and fails its jobs).
    slurmd_timeout: int = 300
    # Not under /tmp: each node gets its own /tmp (a bind mount in its mount namespace), and the
    # cluster's files must stay visible to all nodes, like a shared filesystem.
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="slurm-ci-", dir="/var/tmp")))

    def __post_init__(self):
        self.root = Path(self.root)
        self.conf = self.root / "etc" / "slurm.conf"
        self.nodes: list[Node] = []
        self._procs: list[subprocess.Popen] = []
        self._bridge: str | None = None
        self._hosts_marker: str | None = None
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        remove_stale_clusters()
        atexit.register(self.stop)
        self._started = True
        try:
            self._record()
            for d in ("etc", "state", "run", "log", "munge", "jobs", "nodes"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            self._start_munge()
            self._make_network()
            self._write_conf()
            self._start_slurmctld()
            for node in self.nodes:
                self._start_slurmd(node)
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        # Job processes first (they live in the node namespaces), then the daemons.
        for node in self.nodes:
            pids = _run(["ip", "netns", "pids", node.netns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for node in self.nodes:
            _run(["ip", "netns", "del", node.netns], check=False)
            # The host end can outlive the namespace (slurm.md pitfall).
            _run(["ip", "link", "del", node.veth], check=False)
        if self._bridge:
            _run(["ip", "link", "del", self._bridge], check=False)
        self._remove_hosts_lines()
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            atexit.unregister(self.stop)
        except Exception:  # interpreter shutting down
            pass

    # ------------------------------------------------------------------ pieces
    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = self.root / "munge" / "munge.socket"
        proc = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
             f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "log" / "munged.stderr", "w"))
        self._procs.append(proc)
        self._wait(lambda: self.munge_socket.exists(), 10, "munged socket", proc)

    def _make_network(self) -> None:
        net = _pick_subnet()
        tag = f"{net.network_address.packed[2]}"
        self.ctl_addr = str(net.network_address + 1)
        self._bridge = f"slurmbr{tag}"
        _run(["ip", "link", "add", self._bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.ctl_addr}/24", "dev", self._bridge])
        _run(["ip", "link", "set", self._bridge, "up"])
        for i in range(1, self.n_nodes + 1):
            # Names carry the subnet tag so that two clusters on one machine never collide.
            node = Node(name=f"c{tag}node{i}", addr=str(net.network_address + 10 + i),
                        netns=f"slurm{tag}n{i}", veth=f"slv{tag}n{i}")
            self.nodes.append(node)
            _run(["ip", "netns", "add", node.netns])
            _run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0",
                  "netns", node.netns])
            _run(["ip", "link", "set", node.veth, "master", self._bridge])
            _run(["ip", "link", "set", node.veth, "up"])
            nsexec = ["ip", "-n", node.netns]
            _run(nsexec + ["addr", "add", f"{node.addr}/24", "dev", "eth0"])
            _run(nsexec + ["link", "set", "eth0", "up"])
            _run(nsexec + ["link", "set", "lo", "up"])
        self._add_hosts_lines()

    def _add_hosts_lines(self) -> None:
        self._hosts_marker = f"# slurm-ci {self.root}"
        self._record()
        lines = [f"{n.addr} {n.name} {self._hosts_marker}\n" for n in self.nodes]
        with HOSTS_FILE.open("a") as f:
            f.writelines(lines)

    def _remove_hosts_lines(self) -> None:
        if not self._hosts_marker:
            return
        text = HOSTS_FILE.read_text()
        kept = [ln for ln in text.splitlines(keepends=True) if not ln.rstrip().endswith(self._hosts_marker)]
        # Write in place (not rename): /etc/hosts may be a bind mount.
        with HOSTS_FILE.open("w") as f:
            f.writelines(kept)
        self._hosts_marker = None

    def _write_conf(self) -> None:
        r = self.root
        self.ctl_port = _free_port()
        ctl_host = socket.gethostname().split(".")[0]
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        feature = f" Feature={self.features}" if self.features else ""
        nodes = "\n".join(
            f"NodeName={n.name} NodeAddr={n.addr} CPUs={self.cpus_per_node} Boards=1 "
            f"SocketsPerBoard={self.sockets_per_node} CoresPerSocket={self.cores_per_socket} ThreadsPerCore=1 "
            f"RealMemory={self.real_memory_mb}{gres}{feature} State=UNKNOWN" for n in self.nodes)
        self._write_gres_conf()
        self.conf.write_text(f"""\
ClusterName=citest
SlurmctldHost={ctl_host}({self.ctl_addr})
SlurmctldPort={self.ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (BeginTime = requeue + cred_expire);
# the 120 s default would dominate the requeue test.
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state/ctld
SlurmdSpoolDir={r}/state/slurmd_%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd_%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd_%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin={self.task_plugin}
SlurmdParameters=config_overrides
GresTypes=gpu
SlurmdTimeout={self.slurmd_timeout}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
MailProg=/bin/true
JobRequeue=1
SchedulerParameters=sched_interval=2
MinJobAge=3600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    @property
    def cpus_per_node(self) -> int:
        return self.sockets_per_node * self.cores_per_socket

    def _write_gres_conf(self) -> None:
        """GPUs as placeholder files named like NVIDIA's device nodes: SLURM schedules and counts
        them (and takes the index for CUDA_VISIBLE_DEVICES from the name); nothing opens them.
        Half the GPUs per socket, as on a 2-socket 8-GPU node."""
        if not self.gpus_per_node:
            (self.conf.parent / "gres.conf").write_text("")
            return
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        lines = []
        per_socket = max(1, self.gpus_per_node // self.sockets_per_node)
        for g in range(self.gpus_per_node):
            (dev / f"nvidia{g}").touch()
            socket_ = min(g // per_socket, self.sockets_per_node - 1)
            cores = f"{socket_ * self.cores_per_socket}-{(socket_ + 1) * self.cores_per_socket - 1}"
            lines.append(f"Name=gpu File={dev}/nvidia{g} Cores={cores}\n")
        (self.conf.parent / "gres.conf").write_text("".join(lines))

    def _record(self) -> None:
        """What a later run needs to undo this cluster if this process dies without stop()."""
        (self.root / STATE_FILE).write_text(json.dumps({
            "owner_pid": os.getpid(), "hosts_marker": self._hosts_marker, "bridge": self._bridge,
            "netns": [n.netns for n in self.nodes], "veths": [n.veth for n in self.nodes],
            "pids": [p.pid for p in self._procs],
        }))

    def _start_slurmctld(self) -> None:
        proc = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)],
                                stdout=subprocess.DEVNULL,
                                stderr=open(self.root / "log" / "slurmctld.stderr", "w"))
        self._procs.append(proc)
        self._wait(lambda: self.scontrol("ping", check=False).returncode == 0, 20,
                   "slurmctld to answer ping", proc)

    def _start_slurmd(self, node: Node) -> None:
        # A private /tmp per node, as on real nodes: PMIx (srun --mpi=pmix) creates
        # /tmp/spmix_appdir_<uid>_<job>.<step> on every node and fails if another node made it.
        node_tmp = self.root / "nodes" / node.name / "tmp"
        node_tmp.mkdir(parents=True, exist_ok=True)  # exists on a restart
        node_tmp.chmod(0o1777)
        # What the jobs run from stays visible when it lives under /tmp (a checkout or venv there,
        # as in a CI clone): bind it into the node's /tmp first, then bind that tree over /tmp.
        keep = sorted({os.path.realpath(p) for p in (str(REPO), sys.prefix)
                       if os.path.realpath(p).startswith("/tmp/")})
        keep = [p for p in keep if not any(p.startswith(q + "/") for q in keep)]
        binds = "".join(f"mkdir -p {node_tmp}{p[4:]} && mount --bind {p} {node_tmp}{p[4:]} && " for p in keep)
        inner = (f"{binds}mount --rbind {node_tmp} /tmp && hostname {node.name} && "
                 f"exec slurmd -D -f {self.conf} -N {node.name}")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount",
             "--propagation", "private", "sh", "-c", inner],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log" / f"slurmd_{node.name}.stderr", "w"),
            env=self.env())
        node.proc = proc
        self._procs.append(proc)
        self._record()

    def kill_node(self, name: str) -> None:
        """A node dies: SIGKILL its slurmd and everything it started (slurmstepd, the tasks),
        i.e. every process in its network namespace. The controller notices only by silence."""
        node = next(n for n in self.nodes if n.name == name)
        for pid in _run(["ip", "netns", "pids", node.netns], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if node.proc is not None:
            node.proc.wait(timeout=10)

    def restart_node(self, name: str) -> None:
        """The node is back (ReturnToService=2 returns it to service when its slurmd registers)."""
        node = next(n for n in self.nodes if n.name == name)
        self._procs = [p for p in self._procs if p is not node.proc]
        self._start_slurmd(node)

    def node_state(self, name: str) -> str:
        return self.run_cmd(["sinfo", "-h", "-n", name, "-o", "%T"], check=False).stdout.strip()

    def _wait_idle(self) -> None:
        def all_idle() -> bool:
            out = self.run_cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(ln.split() for ln in out.splitlines() if ln.strip())
            return len(states) == self.n_nodes and all(s == "idle" for s in states.values())
        self._wait(all_idle, 30, "both nodes idle", *[n.proc for n in self.nodes])

    def _wait(self, cond, timeout: float, what: str, *procs) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for p in procs:
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"daemon {p.args} exited ({p.returncode}) while waiting for "
                                       f"{what}\n{self.logs_tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{self.logs_tail()}")

    # ------------------------------------------------------------------ client side
    def env(self, extra: dict | None = None) -> dict:
        # sbatch exports the submitter's environment to the job: leave out whatever another test
        # in this process set for its own rendezvous, and any outer SLURM job's variables.
        drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.conf)
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)  # None = make sure the job does not inherit it
            else:
                env[k] = v
        return env

    def run_cmd(self, cmd: list[str], check: bool = True, env: dict | None = None,
                **kw) -> subprocess.CompletedProcess:
        return _run(cmd, check=check, env=self.env(env), **kw)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run_cmd(["scontrol", *args], check=check)

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> int:
        out = self.run_cmd(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job -o` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout.strip()
        # Values may contain spaces only in the trailing free-text fields we do not use.
        return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float = 180, states=TERMINAL_STATES) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout}s "
                                   f"(reason {info.get('Reason')})\n{self.logs_tail()}")
            time.sleep(0.3)

    def hostnames(self, nodelist: str) -> list[str]:
        return self.scontrol("show", "hostnames", nodelist).stdout.split()

    def logs_tail(self, n: int = 15) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            if lines:
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running two-node cluster for one test module; skipped where it cannot exist."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def show_report(request, title: str, lines: list[str]) -> None:
    """Write lines to the terminal even while pytest captures output (the tests' proof)."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if not tr or not lines:
        return
    with capman.global_and_fixture_disabled():
        tr.write_line("")
        tr.write_sep("-", title)
        for ln in lines:
            tr.write_line(ln)


if __name__ == "__main__":  # manual debugging
    logging.basicConfig(level=logging.INFO)
    c = SlurmCluster().start()
    print(f"export SLURM_CONF={c.conf}   # nodes: {[(n.name, n.addr) for n in c.nodes]}")
    try:
        input("cluster up; press Enter to stop ")
    finally:
        c.stop()


def cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8} (the kernel's Cpus_allowed_list)."""
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus
