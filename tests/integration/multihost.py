"""Several "hosts" on one machine, so integration tests can run Airflow's parts apart.

A *host* here is a handful of Linux namespaces held open by one long-lived process (the "holder"): its own network
namespace (an ``eth0`` on a private bridge, its own ``lo``, its own ports), its own UTS namespace (its hostname) and
its own mount namespace, in which ``/tmp`` is a fresh tmpfs, ``/etc/hosts`` names every host of the network and
``/etc/resolv.conf`` points at the host's own loopback (so looking up any other name fails at once instead of timing
out on a DNS server the hosts cannot reach). Everything else (the filesystem, the venv, PostgreSQL's socket files,
the users, the PID space) is the machine's own. That is just enough separation to catch what a one-process test
cannot: a part that reaches another over ``localhost``, hands a file over through ``/tmp``, trusts its own hostname,
or hangs when a peer drops off the network, without containers, images or a second machine. The root network
namespace sits on the bridge as the gateway and forwards chosen local ports to the hosts (``Network.forward``), since
the machine's PostgreSQL listens on 127.0.0.1 only. Needs root; ``available()`` says whether it can run here, for
``pytest.skip``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Host", "Network", "available"]

SUBNET = "10.231"  # every network is 10.231.N.0/24, N in 1..250; nothing else is ever addressed
STATE_DIR = Path("/run/multihost")  # one directory per live network: what to delete if its owner dies
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # "<prefix>br<6 hex>" and "<prefix><6 hex>v<i>" fit in 15 chars
_READY_TIMEOUT = 10.0

# The holder: set the hostname, give the host a private /tmp, /etc/hosts and /etc/resolv.conf, then idle. Each step
# is chained with && so that reaching "sleep" means all of them worked; the pid stays the same through every exec.
# Directories under /tmp that every host must still see (the venv or checkout of a clone made in /tmp) are
# bound back over the private /tmp from the machine's /tmp, itself bound aside (in the host's private mount
# namespace only) before the tmpfs hides it, and detached once they are in place.
_HOLDER_SCRIPT = (
    'hostname "$1" && old="$2/tmp-of-$1" && mkdir -p "$old" && mount --bind /tmp "$old"'
    ' && mount -t tmpfs -o mode=1777 tmpfs /tmp && mount --bind "$2"/hosts /etc/hosts'
    ' && { [ ! -e /etc/resolv.conf ] || mount --bind "$2"/resolv.conf /etc/resolv.conf; }'
    ' && shift 2 && for dir in "$@"; do mkdir -p "$dir" && mount --bind "$old${dir#/tmp}" "$dir" || exit 1; done'
    ' && umount -l "$old" && exec sleep infinity'
)

Argv = Sequence[str | os.PathLike[str]]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH")
    return path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_tool("ip"), *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@functools.cache
def available() -> str | None:
    """None if this machine can run a Network, else why not (for ``pytest.skip``). Checked once per process."""
    if not os.path.isdir("/proc/self/ns"):
        return "multihost needs Linux namespaces"
    if os.geteuid() != 0:
        return "multihost needs root (network namespaces, bridges, mounts)"
    for tool in ("ip", "unshare", "nsenter", "mount", "hostname", "sleep", "sh"):
        if shutil.which(tool) is None:
            return f"multihost needs {tool}, not found on PATH"
    probe = f"mhprobe{secrets.token_hex(3)}"  # a netns and a bridge, made and deleted at once
    try:
        added = _ip("netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"ip netns add does not work here: {added.stderr.strip()}"
        bridge = _ip("link", "add", "name", probe, "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"cannot create a bridge here: {bridge.stderr.strip()}"
    finally:
        _ip("link", "del", probe, check=False)
        _ip("netns", "del", probe, check=False)
    return None


@functools.cache
def _nsenter_has_wdns() -> bool:
    usage = subprocess.run([_tool("nsenter"), "--help"], capture_output=True, text=True, timeout=10).stdout
    return "--wdns" in usage


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks, to tell it from a later process with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _netns_pids(netns: str) -> list[int]:
    result = _ip("netns", "pids", netns, check=False)
    return [int(word) for word in result.stdout.split()] if result.returncode == 0 else []


def _kill_in_netns(netns: str, pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` only if it is still in ``netns``: through a pidfd, so a reused pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def _empty_netns(netns: str, *, spare: int | None = None, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in ``netns`` but ``spare`` until none is left; returns the survivors (normally none)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in _netns_pids(netns) if pid != spare]
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:
            _kill_in_netns(netns, pid)
        time.sleep(0.05)


def _delete_resources(bridge: str, veths: Sequence[str], netnses: Sequence[str]) -> list[str]:
    """Delete what a network made (whatever of it exists); returns what could not be deleted."""
    left = []
    for netns in netnses:
        if os.path.exists(f"/run/netns/{netns}") and _empty_netns(netns):
            left.append(f"processes in netns {netns}")
    for link in [*veths, bridge]:
        if _ip("link", "show", "dev", link, check=False).returncode == 0:
            deleted = _ip("link", "del", "dev", link, check=False)
            if deleted.returncode != 0:
                left.append(f"link {link}: {deleted.stderr.strip()}")
    for netns in netnses:
        if os.path.exists(f"/run/netns/{netns}"):
            deleted = _ip("netns", "del", netns, check=False)
            if deleted.returncode != 0:
                left.append(f"netns {netns}: {deleted.stderr.strip()}")
    return left


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialises concurrent runs while they pick a subnet and sweep what dead runs left."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(STATE_DIR / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sweep_dead_runs() -> None:
    """Delete the bridges, veths and namespaces of runs whose process died without tearing down (e.g. SIGKILL)."""
    for record_file in STATE_DIR.glob("*/record.json"):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(record["owner_pid"]) == record["owner_start"]:
            continue  # its owner is still running
        if not _delete_resources(record["bridge"], record["veths"], record["netns"]):
            shutil.rmtree(record_file.parent, ignore_errors=True)


def _kill_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process group led by ``proc``, if ``proc`` is still alive (so the group id is surely ours)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


class Host:
    """One host of a Network: run commands in it, take it off the network and back, see what runs in it."""

    def __init__(self, network: Network, name: str, address: str, netns: str, veth: str) -> None:
        self.name = name
        self.address = address  # its eth0 address, 10.231.N.(10+i)
        self.netns = netns  # the `ip netns` name
        self.holder_pid = 0  # the process holding its namespaces (set once started)
        self._network = network
        self._veth = veth  # the bridge's end of its cable

    def __repr__(self) -> str:
        return f"Host({self.name!r}, address={self.address!r}, netns={self.netns!r}, holder_pid={self.holder_pid})"

    def path(self, path: str | os.PathLike[str]) -> Path:
        """``path`` as this host sees it, reachable from the test process (e.g. a file in the host's own /tmp)."""
        path = os.fspath(path)
        if not os.path.isabs(path):
            raise ValueError(f"not an absolute path: {path!r}")
        return Path(f"/proc/{self.holder_pid}/root") / path.lstrip("/")

    def _argv(self, argv: Argv, cwd: str | os.PathLike[str] | None) -> list[str]:
        if isinstance(argv, str | bytes | os.PathLike):
            raise TypeError("argv must be a sequence of arguments, not a single string")
        if not self.holder_pid:
            raise RuntimeError(f"host {self.name} is not running (use it inside `with Network(...)`)")
        # Like subprocess: None means the caller's directory; it must exist as this host sees it (/tmp is its own).
        directory = os.path.abspath(os.getcwd() if cwd is None else cwd)
        if not self.path(directory).is_dir():
            raise FileNotFoundError(errno.ENOENT, f"no such directory in host {self.name}", directory)
        command = [os.fspath(arg) for arg in argv]
        enter = [_tool("nsenter"), "-t", str(self.holder_pid), "--uts", "--mount", "--net"]
        if _nsenter_has_wdns():
            return [*enter, f"--wdns={directory}", "--", *command]
        return [*enter, "--", "sh", "-c", 'cd "$0" && exec "$@"', directory, *command]

    def popen(
        self,
        argv: Argv,
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = True,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host, in a session of its own; the Network kills its group on exit.

        ``env`` is the whole environment (default: this process's). nsenter execs the command in place, so the
        Popen's pid is the command's own, and it inherits ``pass_fds`` as subprocess passes them.
        """
        command = self._argv(argv, cwd)  # validates argv and cwd
        encoding = {"encoding": "utf-8", "errors": "replace"} if text else {}
        proc = subprocess.Popen(
            command, env=env, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True,
            pass_fds=pass_fds, **encoding,
        )  # fmt: skip
        self._network._track(proc)
        return proc

    def run(
        self,
        argv: Argv,
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host and return its exit status and text output; a non-zero status is not an error.

        On timeout the whole process group is killed and subprocess.TimeoutExpired raised.
        """
        proc = self.popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):  # unreaped, the leader still holds the group id
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()  # not read to the end: a daemonised grandchild may still hold it open
            raise subprocess.TimeoutExpired(
                [os.fspath(arg) for arg in argv], exc.timeout, output=_decoded(exc.output), stderr=_decoded(exc.stderr)
            ) from None
        except BaseException:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            self._network._untrack(proc)
        return subprocess.CompletedProcess([os.fspath(arg) for arg in argv], proc.returncode, stdout, stderr)

    def cut(self) -> None:
        """Take this host off the network (its cable unplugged at the bridge); its processes keep running."""
        _ip("link", "set", "dev", self._veth, "down")

    def restore(self) -> None:
        """Put this host back on the network after ``cut()``."""
        _ip("link", "set", "dev", self._veth, "up")

    def pids(self) -> list[int]:
        """Pids of the processes in this host's network namespace, the holder's (``holder_pid``) among them."""
        return _netns_pids(self.netns)


def _decoded(data: str | bytes | None) -> str | None:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


class Network:
    """Hosts on one bridge, with the root network namespace as their gateway; a context manager.

    ``with Network(["serving", "worker"], prefix="md") as net: net["serving"].run(["hostname"])``. Set-up that fails
    halfway, and the exit, delete everything made: the processes started in the hosts (SIGTERM to their groups, then
    SIGKILL after ``grace`` seconds, then SIGKILL to anything else left in a host), the holders, the namespaces, the
    veths, the bridge and the port forwarders. A run killed outright leaves a record under /run/multihost, and the
    next Network made on the machine deletes what that run left.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        prefix: str = "mh",
        grace: float = 5.0,
        share: Sequence[os.PathLike[str] | str] = (),
    ) -> None:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of host names, not a single string")
        if not names or len(set(names)) != len(names) or len(names) > 200:
            raise ValueError(f"need 1 to 200 distinct host names, got {names!r}")
        for name in names:
            if not _HOSTNAME.match(name):
                raise ValueError(f"not a usable hostname (lowercase letters, digits, '-'): {name!r}")
        if not _PREFIX.match(prefix):
            raise ValueError(f"prefix must be 1 to 6 lowercase letters or digits, starting with a letter: {prefix!r}")
        self.names = list(names)
        self.prefix = prefix
        # Of the directories the hosts must see as they are (a venv, a checkout), those under /tmp: outermost only.
        under_tmp = sorted({Path(d).resolve() for d in share if Path(d).resolve().is_relative_to("/tmp")})
        self.share = [str(d) for d in under_tmp if not any(d != o and d.is_relative_to(o) for o in under_tmp)]
        self.grace = grace
        self._tag = secrets.token_hex(3)
        self.bridge = f"{prefix}br{self._tag}"
        self._subnet: int | None = None
        self._hosts: dict[str, Host] = {}
        self._holders: dict[str, subprocess.Popen[Any]] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._procs_lock = threading.Lock()
        self._forwarder: _Forwarder | None = None
        self._state = STATE_DIR / self.bridge

    # -- the public side ------------------------------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: the hosts' default route, where forwarded ports listen."""
        if self._subnet is None:
            raise RuntimeError("the network is not set up (use `with Network(...)`)")
        return f"{SUBNET}.{self._subnet}.1"

    @property
    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    def __getitem__(self, name: str) -> Host:
        return self._hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def forward(self, port: int, target: tuple[str, int] | None = None) -> tuple[str, int]:
        """Make ``target`` (default 127.0.0.1:``port`` of the root namespace) reachable from the hosts at
        (gateway, ``port``), through a TCP forwarder in a daemon thread of this process. Idempotent."""
        target = ("127.0.0.1", port) if target is None else (target[0], int(target[1]))
        if self._forwarder is None:
            self._forwarder = _Forwarder(self.gateway)
        self._forwarder.add(port, target)
        return self.gateway, port

    def __enter__(self) -> Network:
        reason = available()
        if reason is not None:
            raise RuntimeError(reason)
        try:
            self._set_up()
        except BaseException as exc:
            left = self._tear_down()
            if left:
                exc.add_note(f"multihost: could not clean up: {'; '.join(left)}")
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        left = self._tear_down()
        if left:
            message = f"multihost: could not clean up: {'; '.join(left)}"
            if exc is None:
                raise RuntimeError(message)
            exc.add_note(message)

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _set_up(self) -> None:
        veths = [f"{self.prefix}{self._tag}v{i}" for i in range(len(self.names))]
        netnses = [f"{self.prefix}-{self._tag}-{name}" for name in self.names]
        with _state_lock():
            _sweep_dead_runs()
            self._subnet = self._free_subnet()
            self._state.mkdir(mode=0o700)
            record = {
                "owner_pid": os.getpid(),
                "owner_start": _start_time(os.getpid()),
                "bridge": self.bridge,
                "veths": veths,
                "netns": netnses,
            }
            (self._state / "record.json").write_text(json.dumps(record))
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", "dev", self.bridge, "up")
        addresses = {name: f"{SUBNET}.{self._subnet}.{10 + i}" for i, name in enumerate(self.names)}
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{address} {name}" for name, address in addresses.items()]
        files = {"hosts": "\n".join(lines), "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1"}
        for file_name, text in files.items():
            (self._state / file_name).write_text(text + "\n")
            (self._state / file_name).chmod(0o644)  # a bind mount needs no access to its source's directory
        for name, veth, netns in zip(self.names, veths, netnses, strict=True):
            address = addresses[name]
            self._hosts[name] = Host(self, name, address, netns, veth)
            _ip("netns", "add", netns)
            _ip("link", "add", "name", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", "dev", veth, "master", self.bridge, "up")
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "dev", "eth0", "up")
            _ip("-n", netns, "link", "set", "dev", "lo", "up")
            _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        for host in self._hosts.values():  # start every holder, then wait for them all
            self._holders[host.name] = subprocess.Popen(
                [
                    *(_tool("ip"), "netns", "exec", host.netns),
                    *(_tool("unshare"), "--uts", "--mount", "--propagation", "private", "--"),
                    *("sh", "-c", _HOLDER_SCRIPT, "sh", host.name, str(self._state)),
                    *self.share,
                ],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        for host in self._hosts.values():
            host.holder_pid = self._wait_for_holder(host.name, self._holders[host.name])

    def _free_subnet(self) -> int:
        """A 10.231.N.0/24 no address or route of this machine uses (other runs' bridges included)."""
        used_text = _ip("-o", "addr").stdout + _ip("route", "show", "table", "all").stdout
        used = {int(n) for n in re.findall(rf"\b{re.escape(SUBNET)}\.(\d+)\.", used_text)}
        free = [n for n in range(1, 251) if n not in used]
        if not free:
            raise RuntimeError(f"no free {SUBNET}.N.0/24 subnet on this machine")
        return random.choice(free)

    @staticmethod
    def _wait_for_holder(name: str, holder: subprocess.Popen[Any]) -> int:
        """Wait until the holder has exec'd sleep (so its hostname, /tmp and /etc/hosts are in place)."""
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if holder.poll() is not None:
                error = holder.stderr.read().decode(errors="replace").strip() if holder.stderr else ""
                raise RuntimeError(f"host {name}: holder exited with {holder.returncode}: {error}")
            with contextlib.suppress(OSError):
                if Path(f"/proc/{holder.pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                    return holder.pid
            time.sleep(0.01)
        raise RuntimeError(f"host {name}: holder not ready after {_READY_TIMEOUT}s")

    # -- tear-down ------------------------------------------------------------------------------------------------

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        with self._procs_lock:
            self._procs.append(proc)

    def _untrack(self, proc: subprocess.Popen[Any]) -> None:
        with self._procs_lock, contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def _tear_down(self) -> list[str]:
        """Delete everything this network made; returns what could not be deleted (normally nothing)."""
        left: list[str] = []
        if self._forwarder is not None:
            self._forwarder.stop()
            self._forwarder = None
        with self._procs_lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            _kill_group(proc, signal.SIGKILL)
        for proc in procs:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for host in self._hosts.values():  # anything else started in a host: daemons, other sessions
            if os.path.exists(f"/run/netns/{host.netns}"):
                _empty_netns(host.netns, spare=self._holders[host.name].pid if host.name in self._holders else None)
        for holder in self._holders.values():
            holder.kill()
        for holder in self._holders.values():
            holder.wait()
            if holder.stderr is not None:
                holder.stderr.close()
        for host in self._hosts.values():
            host.holder_pid = 0
        self._holders.clear()
        if self._subnet is not None:  # the bridge may exist: veths and netns only if their host got that far
            netnses = [f"{self.prefix}-{self._tag}-{name}" for name in self.names]
            veths = [f"{self.prefix}{self._tag}v{i}" for i in range(len(self.names))]
            left += _delete_resources(self.bridge, veths, netnses)
        if not left:
            shutil.rmtree(self._state, ignore_errors=True)
        self._hosts.clear()
        self._subnet = None
        return left


class _Forwarder:
    """TCP forwarders from (gateway, port) to a target, all on one asyncio loop in a daemon thread."""

    def __init__(self, listen_host: str) -> None:
        self._listen_host = listen_host
        self._servers: dict[int, tuple[asyncio.Server, tuple[str, int]]] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="multihost-forwarder", daemon=True)
        self._thread.start()

    def add(self, port: int, target: tuple[str, int]) -> None:
        if port in self._servers:
            if self._servers[port][1] != target:
                raise ValueError(f"port {port} is already forwarded to {self._servers[port][1]}")
            return

        async def start() -> asyncio.Server:
            return await asyncio.start_server(
                functools.partial(self._connect, target), self._listen_host, port, reuse_address=True
            )

        server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)
        self._servers[port] = (server, target)

    async def _connect(
        self, target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client: connect to the target, then copy both ways until both ways are done."""
        upstream: asyncio.StreamWriter | None = None
        self._writers.add(writer)
        try:
            upstream_reader, upstream = await asyncio.wait_for(asyncio.open_connection(*target), timeout=10)
            self._writers.add(upstream)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(upstream_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass  # target unreachable (TimeoutError included), or stop(); 3.11 logs a cancelled handler as an error
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._writers.discard(end)
                    end.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy until end of file, then pass the half-close on; on an error, abort the sink (ending the other way)."""
        try:
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except OSError:
            sink.transport.abort()

    def stop(self) -> None:
        async def shut() -> None:
            for server, _ in self._servers.values():
                server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for server, _ in self._servers.values():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), timeout=2)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        self._servers.clear()
