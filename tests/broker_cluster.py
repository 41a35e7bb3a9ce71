"""A local three-node RabbitMQ cluster for fault tests and the benchmark, without Docker.

    python -m tests.broker_cluster up | down | status

    cluster = BrokerCluster()
    cluster.up()                      # about 13 s from cold; False if it was already up
    cluster.urls()                    # "amqp://guest:guest@127.0.0.1:5701/,...5703/"
    cluster.kill("t2")                # SIGKILL; or stop("t2") for a clean shutdown
    cluster.start("t2")               # back, clustered again
    cluster.wait_replicas_caught_up("purchases.0")
    cluster.leader_of("purchases.0")  # "t1@localhost"
    cluster.down()                    # stops every node and removes the base directory

Nodes t1, t2 and t3 @localhost listen on 127.0.0.1 only: AMQP 5701-5703, Erlang distribution
25701-25703, management (guest/guest) 15701-15703. Their data, logs, config, Erlang cookie and an
empty env file live under one base directory (RABBITMQ_CLUSTER_BASE, default
/tmp/ticketing-rabbitmq-cluster), so the system node (rabbit@localhost on 5672) and its
/etc/rabbitmq files are never read or touched; the two share only epmd.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

# The /usr/sbin wrappers would switch to the rabbitmq user, its cookie and /etc/rabbitmq.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
DEFAULT_BASE = Path("/tmp/ticketing-rabbitmq-cluster")
START_TIMEOUT = 60.0
# Every process we start carries this variable (value: the node's directory), so `down` finds
# a node's beam and its children even when its pid file is stale or was never written.
PROCESS_TAG = "TICKETING_BROKER_CLUSTER_NODE"
EPMD_PORT = 4369
# How long a starting node may show no process of its own before it counts as exited.
GONE_AFTER_S = 3.0
# How long a thawed node is given to rejoin on its own (it takes about 10 s).
REJOIN_S = 20.0


class ClusterError(RuntimeError):
    """A node did not start, stop or cluster; the message names it and quotes its log."""


@dataclass(frozen=True)
class Node:
    name: str
    amqp_port: int
    dist_port: int
    http_port: int
    dir: Path

    @property
    def short(self) -> str:
        return self.name.split("@")[0]

    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.short}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / f"{self.name}.log"

    @property
    def console_file(self) -> Path:
        return self.dir / "log" / "console.log"


class BrokerCluster:
    def __init__(self, base: Path | str | None = None) -> None:
        self.base = Path(base or os.environ.get("RABBITMQ_CLUSTER_BASE") or DEFAULT_BASE)
        self.nodes = [
            Node(f"t{i}@localhost", 5700 + i, 25700 + i, 15700 + i, self.base / f"t{i}")
            for i in (1, 2, 3)
        ]

    # -- the whole cluster ------------------------------------------------------------------

    def up(self, timeout: float = START_TIMEOUT) -> bool:
        """Start the three nodes and wait until they run clustered and accept AMQP.

        Returns False, at once, when they already did (a fixture then leaves them running).
        """
        if self.is_healthy() and self._configured_as_now():
            return False
        self.down()  # a half-started or stale cluster is cheaper to rebuild than to repair
        for node in self.nodes:
            if _port_open(node.amqp_port) or _port_open(node.dist_port):
                raise ClusterError(
                    f"{node.name}: port {node.amqp_port} or {node.dist_port} is in use"
                )
        self._write_files()
        self._ensure_epmd()
        deadline = time.monotonic() + timeout
        seed, *others = self.nodes
        try:
            # The others join the seed only once it has booted: a node that joins while the
            # seed still enables its feature flags fails with schema_integrity_check_failed.
            self._launch(seed)
            self._wait_ready([seed], deadline)
            for node in others:
                self._launch(node)
            self._wait_ready(others, deadline)
            self._wait_clustered(self.nodes, deadline)
        except ClusterError:
            for node in self.nodes:  # no stray nodes after a failed start; the logs stay
                self._kill_processes(node)
            raise
        return True

    def down(self) -> None:
        """Kill every node of this base (running, half-started or orphaned) and remove the base."""
        for node in self.nodes:
            self._kill_processes(node)
        self._stop_own_epmd()
        shutil.rmtree(self.base, ignore_errors=True)

    def is_healthy(self) -> bool:
        """Every node runs, and each sees the other two (after a partition, some may not)."""
        names = [n.name for n in self.nodes]
        return all(self.is_running(name) for name in names) and all(
            isinstance(seen := _running_nodes_seen_by(node), list) and sorted(seen) == names
            for node in self.nodes
        )

    def urls(self) -> str:
        return ",".join(f"amqp://guest:guest@127.0.0.1:{n.amqp_port}/" for n in self.nodes)

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes as one running member sees them."""
        for node in self.nodes:
            if not self.is_running(node.name):
                continue
            seen = _running_nodes_seen_by(node)
            if isinstance(seen, list):
                return seen
        return []

    def status(self) -> str:
        lines = []
        for node in self.nodes:
            pid = _read_pid(node.pid_file)
            if self.is_running(node.name):
                state = "running"
            elif self._pid(node) is not None:
                state = "starting (no AMQP yet)"
            else:
                state = "not running" + (" (stale pid file)" if pid else "")
            lines.append(
                f"{node.name:14} pid {pid or '-':>7}  amqp {node.amqp_port}  "
                f"http {node.http_port}  dist {node.dist_port}  {state}"
            )
        lines.append(f"cluster running nodes: {', '.join(self.running_nodes()) or '-'}")
        return "\n".join(lines)

    # -- one node, for fault tests ----------------------------------------------------------

    def is_running(self, name: str) -> bool:
        node = self._node(name)
        pid = self._pid(node)
        return pid is not None and _port_open(node.amqp_port)

    def kill(self, name: str) -> None:
        """SIGKILL the node's beam; return once it, its children and its epmd name are gone."""
        node = self._node(name)
        os.kill(self._running_pid(name), signal.SIGKILL)
        self._kill_processes(node)
        self._wait_unregistered(node)

    def freeze(self, name: str) -> None:
        """SIGSTOP the node's beam: a hung host. Its sockets stay open and answer nothing, and
        the other nodes count it as running until net_ticktime passes without a tick (11-19 s
        here; about a minute with RabbitMQ's default)."""
        os.kill(self._running_pid(name), signal.SIGSTOP)

    def thaw(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """SIGCONT a frozen node's beam; return once the cluster is whole again.

        A node frozen long enough for the others to give it up finds itself cut off when it
        wakes. It pauses and rejoins (pause_minority) if it sees itself alone first; if its peers
        reconnect to it first, the cluster stays partitioned, and it is restarted, as an operator
        would (README, "A node that hung")."""
        os.kill(self._running_pid(name), signal.SIGCONT)
        if not _wait_until(self.is_healthy, REJOIN_S, interval=0.5):
            self.kill(name)
            self.start(name, timeout)
        # Rejoined, it may still refuse new quorum queues for a moment (cluster_not_formed).
        if not _wait_until(self._takes_quorum_queues, timeout, interval=0.5):
            raise ClusterError(f"after {name} thawed, no quorum queue can be declared")

    def _takes_quorum_queues(self) -> bool:
        """Whether a quorum queue replicated on every node can be declared through each."""
        arguments = {"x-queue-type": "quorum", "x-quorum-initial-group-size": len(self.nodes)}
        for node in self.nodes:
            url = f"http://127.0.0.1:{node.http_port}/api/queues/%2F/ticketing-cluster-probe"
            try:
                declared = httpx.put(
                    url,
                    json={"durable": True, "arguments": arguments},
                    auth=("guest", "guest"),
                    timeout=5,
                )
                httpx.delete(url, auth=("guest", "guest"), timeout=5)
            except httpx.HTTPError:
                return False
            if declared.status_code not in (201, 204):
                return False
        return True

    def _running_pid(self, name: str) -> int:
        node = self._node(name)
        pid = self._pid(node)
        if pid is None:
            raise ClusterError(f"{node.name} is not running (pid file {node.pid_file})")
        return pid

    def stop(self, name: str) -> None:
        """Stop the node gracefully; return once its OS process has exited."""
        node = self._node(name)
        self._running_pid(name)
        # With the pid file, `stop` waits for the OS process to exit, not only for the app.
        result = self._ctl("rabbitmqctl", node, "stop", str(node.pid_file), timeout=60)
        if result.returncode != 0:
            raise ClusterError(f"{node.name}: rabbitmqctl stop failed: {result.stderr.strip()}")
        self._kill_processes(node)
        self._wait_unregistered(node)

    def start(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Restart a stopped or killed node; return once it runs and is clustered again."""
        node = self._node(name)
        if self.is_running(node.name):
            raise ClusterError(f"{node.name} is already running")
        deadline = time.monotonic() + timeout
        # Once more if it dies while starting: on a loaded machine a node just stopped has been
        # seen to exit again at once, with nothing in its logs.
        for attempt in (1, 2):
            self._kill_processes(node)  # leftovers of a crash would hold its ports or epmd name
            self._launch(node)
            try:
                self._wait_ready([node], deadline)
                break
            except ClusterError:
                if attempt == 2:
                    raise
        self._wait_clustered([node], deadline)

    def leader_of(self, queue: str, timeout: float = 10) -> str:
        """The node holding the leader of a quorum queue, from any running node's management API.

        Right after its leader dies the API reports no leader until the election ends, so this
        waits for one.
        """
        leader: str | None = None

        def elected() -> bool:
            nonlocal leader
            leader = self.queue_info(queue).get("leader")
            return bool(leader)

        if not _wait_until(elected, timeout, interval=0.1) or leader is None:
            raise ClusterError(f"no leader for {queue!r} within {timeout} s")
        return leader

    def queue_info(self, queue: str) -> dict[str, Any]:
        """GET /api/queues/%2F/<queue> from the first running node that answers."""
        errors = []
        for node in self.nodes:
            if not self.is_running(node.name):
                continue
            url = f"http://127.0.0.1:{node.http_port}/api/queues/%2F/{quote(queue, safe='')}"
            try:
                response = httpx.get(url, auth=("guest", "guest"), timeout=5)
            except httpx.HTTPError as error:
                errors.append(f"{node.name}: {error!r}")
                continue
            if response.status_code == 404:
                raise ClusterError(f"queue {queue!r} does not exist")
            if response.is_success:
                info: dict[str, Any] = response.json()
                return info
            errors.append(f"{node.name}: HTTP {response.status_code}")
        raise ClusterError(f"no management API answered for {queue!r}: {errors}")

    def quorum_status(self, queue: str) -> list[dict[str, Any]]:
        """Each member's Raft state and indexes (`rabbitmq-queues quorum_status`), live from Ra."""
        for node in self.nodes:
            if not self.is_running(node.name):
                continue
            result = self._ctl(
                "rabbitmq-queues", node, "quorum_status", queue, "--formatter", "json"
            )
            if result.returncode == 0:
                members: list[dict[str, Any]] = json.loads(result.stdout)
                return members
        raise ClusterError(f"no running node could report the quorum status of {queue!r}")

    def wait_replicas_caught_up(self, queue: str, timeout: float = 60) -> None:
        """Wait until every member of the quorum queue has in its log all that the leader had
        committed when the wait began: a restarted node has replayed what it missed.

        The management API's `online` is no such signal: it lists a restarted member as soon
        as its Ra server runs, before it holds a single entry. Nor is a follower's commit
        index, which it learns from the leader before its log is filled.
        """
        target: int | None = None

        def caught_up() -> bool:
            nonlocal target
            members = self.quorum_status(queue)
            if target is None:
                leaders = [m for m in members if m["Raft State"] == "leader"]
                if not leaders:
                    return False
                target = _index(leaders[0], "Commit Index")
            return len(members) == len(self.nodes) and all(
                m["Raft State"] in ("leader", "follower")
                and min(_index(m, "Log Index"), _index(m, "Commit Index")) >= target
                for m in members
            )

        if not _wait_until(caught_up, timeout, interval=0.5):
            raise ClusterError(
                f"replicas of {queue!r} did not catch up: {self.quorum_status(queue)}"
            )

    # -- internals ---------------------------------------------------------------------------

    def _node(self, name: str) -> Node:
        for node in self.nodes:
            if name in (node.name, node.short):
                return node
        raise ValueError(f"unknown node {name!r}; expected one of {[n.name for n in self.nodes]}")

    @property
    def _cookie_home(self) -> Path:
        return self.base / "home"

    def _write_files(self) -> None:
        self._cookie_home.mkdir(parents=True)
        cookie = self._cookie_home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)  # Erlang refuses a cookie file that others can read
        (self.base / "empty-env.conf").write_text("")
        for node in self.nodes:
            (node.dir / "log").mkdir(parents=True)
            (node.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
            (node.dir / "rabbitmq.conf").write_text(self._config(node))

    def _config(self, node: Node) -> str:
        # t1 knows no peer and boots alone; t2 and t3 know only t1 (and themselves) and
        # join it. Had all three listed each other, the first to take the discovery lock
        # would wait out its whole retry budget before booting.
        peers = [] if node is self.nodes[0] else [self.nodes[0], node]
        seed = "".join(
            f"cluster_formation.classic_config.nodes.{i} = {peer.name}\n"
            for i, peer in enumerate(peers, 1)
        )
        return (
            f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {node.http_port}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"{seed}"
            # As deploy/rabbitmq/cluster.conf: a hung node is given up, and the queues it
            # leads elect new leaders, within 11-19 s rather than a minute; and the side that
            # lost touch with the majority pauses until it is back.
            "net_ticktime = 15\n"
            "cluster_partition_handling = pause_minority\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )

    def _configured_as_now(self) -> bool:
        """Whether the running nodes were started with this file's configuration (a cluster left
        running by an older version of it is rebuilt)."""
        try:
            return all(
                (node.dir / "rabbitmq.conf").read_text() == self._config(node)
                for node in self.nodes
            )
        except OSError:
            return False

    def _env(self, node: Node) -> dict[str, str]:
        # The caller's RABBITMQ_* and ERL_* (RABBITMQ_URL, ERL_FLAGS...) would reach the nodes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self._cookie_home),  # the Erlang cookie, for the nodes and the CLI tools
            RABBITMQ_CONF_ENV_FILE=str(self.base / "empty-env.conf"),
            RABBITMQ_CONFIG_FILE=str(node.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node.dir / "enabled_plugins"),
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.dir / "log"),
            RABBITMQ_PID_FILE=str(node.pid_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _launch(self, node: Node) -> None:
        node.pid_file.unlink(missing_ok=True)
        with node.console_file.open("ab") as console:
            # setsid forks and returns at once: the node is no child of ours (it outlives
            # `make cluster-up`; pytest holds no handle to it) and, in a session of its own,
            # gets no Ctrl-C meant for pytest or make.
            subprocess.run(
                ["setsid", "--fork", str(RABBITMQ_BIN / "rabbitmq-server")],
                env={**self._env(node), PROCESS_TAG: str(node.dir)},
                cwd=node.dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                check=True,
            )

    def _ctl(
        self, tool: str, node: Node, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [str(RABBITMQ_BIN / tool), "-n", node.name, *args],
                env=self._env(node),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([tool, *args], 124, "", f"{tool} timed out")

    def _wait_ready(self, nodes: list[Node], deadline: float) -> None:
        """Wait until each node's beam lives and its AMQP and management ports answer."""
        pending = list(nodes)
        # A node counts as gone only once none of its processes was seen for a while: right
        # after the launch, a scan of /proc can miss the processes being forked and exec'd.
        seen = dict.fromkeys((node.name for node in nodes), time.monotonic())
        while pending:
            for node in list(pending):
                if _port_open(node.amqp_port) and _port_open(node.http_port):
                    pending.remove(node)
                elif _tagged_pids(str(node.dir)):
                    seen[node.name] = time.monotonic()
                elif time.monotonic() - seen[node.name] > GONE_AFTER_S:
                    raise self._failure(node, "exited during start-up")
            if pending and time.monotonic() > deadline:
                raise self._failure(pending[0], "did not accept AMQP in time")
            time.sleep(0.2)

    def _wait_clustered(self, nodes: list[Node], deadline: float) -> None:
        expected = sorted(n.name for n in self.nodes)
        for node in nodes:
            while True:
                seen = _running_nodes_seen_by(node)
                if isinstance(seen, list) and sorted(seen) == expected:
                    break
                if time.monotonic() > deadline:
                    raise self._failure(node, f"is not clustered; its running nodes: {seen}")
                time.sleep(0.2)

    def _failure(self, node: Node, what: str) -> ClusterError:
        tails = [f"--- {path} ---\n{_tail(path)}" for path in (node.log_file, node.console_file)]
        return ClusterError(f"{node.name} {what}\n" + "\n".join(tails))

    def _pid(self, node: Node) -> int | None:
        """The node's beam from its pid file, if that process lives and is ours: a stale pid
        file may name a pid the system has since given to another process."""
        pid = _read_pid(node.pid_file)
        return pid if pid is not None and _alive(pid) and _tagged(pid, str(node.dir)) else None

    def _kill_processes(self, node: Node) -> None:
        """SIGKILL whatever still runs for the node (beam, erl_child_setup, its port programs)
        and wait until epmd has dropped its name, so that it can start again at once."""
        pids = _tagged_pids(str(node.dir))
        # The rabbitmq-server script goes last and gets a moment to exit by itself: it reaps
        # its beam, which would otherwise wait for init to reap it.
        scripts = [p for p in pids if _is_server_script(p)]
        beams = [p for p in pids if p not in scripts]
        for group, grace in ((beams, 0.0), (scripts, 2.0)):
            _wait_until(partial(_all_dead, group), grace)
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not _wait_until(partial(_all_dead, group), 10):
                raise ClusterError(f"{node.name}: processes {group} survived SIGKILL")
        if pids:
            self._wait_unregistered(node)

    def _wait_unregistered(self, node: Node) -> None:
        # epmd drops a name when the node's socket closes; until then the name cannot restart.
        if not _wait_until(lambda: node.short not in self._names(), 10):
            raise ClusterError(f"epmd still lists {node.short} after its node died")

    def _names(self) -> dict[str, int]:
        """The node names epmd knows, with their distribution ports (epmd NAMES_REQ)."""
        try:
            with socket.create_connection(("127.0.0.1", EPMD_PORT), 2) as sock:
                sock.sendall(b"\x00\x01n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
        except OSError:
            return {}
        names = {}
        for line in data[4:].decode().splitlines():  # "name t1 at port 25701"
            parts = line.split()
            if len(parts) == 5:
                names[parts[1]] = int(parts[4])
        return names

    def _ensure_epmd(self) -> None:
        # The nodes register with the system's epmd. Without one, start ours on loopback and
        # note it, so that `down` stops it again (erl would leave one listening everywhere).
        if _port_open(EPMD_PORT):
            return
        subprocess.run(
            ["epmd", "-daemon", "-address", "127.0.0.1"],
            check=True,
            env={**os.environ, PROCESS_TAG: str(self.base / "epmd")},
        )
        (self.base / "epmd-started").touch()
        if not _wait_until(lambda: _port_open(EPMD_PORT), 5):
            raise ClusterError("epmd did not start")

    def _stop_own_epmd(self) -> None:
        if (self.base / "epmd-started").exists():
            # Refuses (and leaves it running) while any node is still registered.
            subprocess.run(["epmd", "-kill"], capture_output=True, check=False)


class EarlyStart:
    """The cluster brought up on a thread of its own while the tests before the cluster tests run
    (tests/conftest.py starts it once the run's tests are known): three nodes take half a
    minute to boot on a slow machine, and the cluster tests then find them running."""

    def __init__(self) -> None:
        self._started: Future[bool] | None = None
        self._taken = False

    def begin(self) -> None:
        started: Future[bool] = Future()

        def start() -> None:
            try:
                started.set_result(BrokerCluster().up())
            except BaseException as exc:  # handed to whoever waits for the cluster
                started.set_exception(exc)

        threading.Thread(target=start, name="broker-cluster-start", daemon=True).start()
        self._started = started

    @property
    def begun(self) -> bool:
        return self._started is not None

    def take(self) -> bool:
        """Wait for the early start: whether it started the cluster (the taker then stops it),
        or its failure, raised."""
        assert self._started is not None
        started_it = self._started.result(timeout=2 * START_TIMEOUT)
        self._taken = True  # (not before: a run interrupted while waiting still stops it)
        return started_it

    def abandon(self) -> None:
        """At the end of the run: stop the cluster if it was started early and nobody took it
        (the cluster tests were interrupted or never reached)."""
        if self._started is None or self._taken:
            return
        with contextlib.suppress(Exception):
            if self._started.result(timeout=2 * START_TIMEOUT):
                BrokerCluster().down()


EARLY_START = EarlyStart()


def _running_nodes_seen_by(node: Node) -> list[str] | str:
    """The cluster's running nodes as `node` sees them, from its management API (what
    `rabbitmqctl cluster_status` tells, without booting an Erlang VM for each question); the
    error, if it did not answer."""
    try:
        response = httpx.get(
            f"http://127.0.0.1:{node.http_port}/api/nodes", auth=("guest", "guest"), timeout=5
        )
        response.raise_for_status()
    except httpx.HTTPError as error:
        return repr(error)
    return [member["name"] for member in response.json() if member.get("running")]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _all_dead(pids: list[int]) -> bool:
    return not any(_alive(pid) for pid in pids)


def _is_server_script(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[0] in (b"/bin/sh", b"sh") and any(a.endswith(b"/rabbitmq-server") for a in argv)


def _tagged(pid: int, value: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{PROCESS_TAG}={value}".encode() in environ.split(b"\0")


def _tagged_pids(value: str) -> list[int]:
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if pid != os.getpid() and _tagged(pid, value)]


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _index(member: dict[str, Any], key: str) -> int:
    value = member[key]  # "" for a member whose node is down
    return value if isinstance(value, int) else -1


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str]) -> int:
    commands = ("up", "down", "status")
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: python -m tests.broker_cluster {'|'.join(commands)}", file=sys.stderr)
        return 2
    cluster = BrokerCluster()
    try:
        if argv[0] == "up":
            started = time.monotonic()
            if cluster.up():
                print(f"cluster up in {time.monotonic() - started:.1f} s: {cluster.urls()}")
            else:
                print(f"cluster already up: {cluster.urls()}")
        elif argv[0] == "down":
            cluster.down()
            print(f"cluster down, {cluster.base} removed")
        else:
            print(cluster.status())
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
