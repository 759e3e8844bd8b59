"""Local MQTT brokers for fedsb: an embedded amqtt broker and a generated mosquitto setup.

Both listen on 127.0.0.1 only. The embedded broker (amqtt, MQTT 3.1.1, anonymous) needs
nothing installed; `write_mosquitto_config` + `start_mosquitto` give a real broker with
MQTT 5, packet size limits, TLS, passwords and a per-client ACL.

Auth file (TOML) read by `parse_auth_file`; user names are what clients log in with, and a
client's user name must equal its fedsb client id (the ACL matches topics on it)::

    [aggregator]
    user = "agg"
    password = "aggregator-secret"

    [clients]
    c1 = "secret-1"
    c2 = "secret-2"

User names match ``[A-Za-z0-9_.-]{1,64}``; passwords are non-empty single-line strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedsb.errors import ConfigError, FedsbError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
MAX_MQTT_PACKET = 268_435_455  # the largest packet MQTT's variable-length header can describe
STOP_WAIT_S = 5.0
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class BrokerError(FedsbError):
    """A broker cannot be configured, started or stopped."""


@dataclass
class BrokerHandle:
    """A running local broker; `stop()` (or leaving the `with` block) shuts it down."""

    url: str
    host: str
    port: int
    ca_file: Path | None
    kind: str
    _stopper: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        """Stop the broker; calling it again does nothing."""
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _require_loopback(host: str) -> None:
    """Refuse anything but the loopback interface: fedsb's local brokers never face a network."""
    if host not in LOOPBACK:
        raise BrokerError(f"local brokers bind 127.0.0.1 only, got host {host!r}")


def _port_accepts(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- embedded (amqtt)


class _EmbeddedBroker:
    """An amqtt Broker on its own asyncio loop in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_requested: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name=f"fedsb-amqtt-{port}", daemon=True)

    def config(self) -> dict[str, Any]:
        """amqtt configuration: one TCP listener, anonymous clients, no $SYS or packet logging."""
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread, never lost
            self.error = exc
        finally:
            self.ready.set()
            _close_loop(loop)

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        self.stop_requested = asyncio.Event()
        broker = Broker(self.config(), loop=asyncio.get_running_loop())
        await broker.start()
        self.ready.set()
        await self.stop_requested.wait()
        # At shutdown amqtt warns about messages still queued for clients that are gone
        # (e.g. their `offline` wills): nothing a user can act on, so not shown.
        amqtt_log = logging.getLogger("amqtt.broker")
        level = amqtt_log.level
        amqtt_log.setLevel(logging.ERROR)
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=STOP_WAIT_S * 2)
        finally:
            amqtt_log.setLevel(level)

    def start(self, timeout_s: float) -> None:
        """Start the thread and return once the port accepts TCP connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        if not self.ready.wait(timeout_s):
            self.stop()
            raise BrokerError(f"embedded broker did not start within {timeout_s:g} s")
        if self.error is not None:
            raise BrokerError(f"embedded broker failed to start: {self.error}") from self.error
        try:
            _wait_for_port(self.host, self.port, deadline, alive=self.thread.is_alive, what="amqtt")
        except BrokerError:
            self.stop()
            raise

    def stop(self) -> None:
        """Ask the loop to shut the broker down and join the thread (bounded)."""
        loop, event = self.loop, self.stop_requested
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
                loop.call_soon_threadsafe(event.set)
        self.thread.join(STOP_WAIT_S * 3)
        if self.thread.is_alive():
            log.warning("embedded broker thread on port %d did not finish", self.port)
        elif self.error is not None:
            log.warning("embedded broker on port %d stopped with: %s", self.port, self.error)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what amqtt left running (client handlers), then close the loop."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        gathered = asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(gathered, timeout=STOP_WAIT_S))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def start_embedded_broker(
    port: int | None = None, *, host: str = "127.0.0.1", timeout_s: float = 10
) -> BrokerHandle:
    """Run an amqtt broker (MQTT 3.1.1, anonymous) in-process; returns once it accepts."""
    _require_loopback(host)
    runner = _EmbeddedBroker(host, port if port is not None else free_port(host))
    runner.start(timeout_s)
    log.info("embedded MQTT broker listening on %s:%d", host, runner.port)
    return BrokerHandle(
        url=f"mqtt://{host}:{runner.port}",
        host=host,
        port=runner.port,
        ca_file=None,
        kind="embedded",
        _stopper=runner.stop,
    )


def _mqtt_connack(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether an MQTT 3.1.1 CONNECT (clean, anonymous) gets a successful CONNACK.

    A bare TCP probe would do, but amqtt logs every connection that sends no CONNECT as an error.
    """
    client_id = b"fedsb-probe-" + secrets.token_hex(4).encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(bytes([0x10, len(body)]) + body)
            connack = sock.recv(4)
            sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return connack == b"\x20\x02\x00\x00"


def _wait_for_port(
    host: str, port: int, deadline: float, *, alive: Callable[[], bool], what: str
) -> None:
    """Poll until the broker answers an MQTT CONNECT; BrokerError on death or timeout."""
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerError(f"{what} exited before accepting connections on {host}:{port}")
        if _mqtt_connack(host, port):
            return
        time.sleep(0.05)
    raise BrokerError(f"{what} did not accept connections on {host}:{port} in time")


# ---------------------------------------------------------------- users and auth file


@dataclass
class MosquittoUsers:
    """Broker accounts: the aggregator (user, password) and each client's password."""

    aggregator: tuple[str, str]
    clients: dict[str, str]

    def __post_init__(self) -> None:
        agg_user, agg_password = self.aggregator
        _check_account(agg_user, agg_password, "aggregator")
        for user, password in self.clients.items():
            _check_account(user, password, f"client {user!r}")
        if agg_user in self.clients:
            raise ConfigError(f"user {agg_user!r} is both the aggregator and a client")

    def all(self) -> dict[str, str]:
        """Every user name with its password, the aggregator first."""
        return {self.aggregator[0]: self.aggregator[1], **self.clients}


def _check_account(user: object, password: object, what: str) -> None:
    """User names fit topic levels and the ACL; passwords are non-empty single lines."""
    if not isinstance(user, str) or not NAME_RE.fullmatch(user):
        raise ConfigError(f"{what}: user name {user!r} must match [A-Za-z0-9_.-]{{1,64}}")
    if not isinstance(password, str) or not password:
        raise ConfigError(f"{what}: password must be a non-empty string")
    if any(ch in password for ch in "\r\n\0"):
        raise ConfigError(f"{what}: password must not contain line breaks or NUL")


def parse_auth_file(path: Path | str) -> MosquittoUsers:
    """Read the TOML auth file described in the module docstring; ConfigError on any flaw."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"auth file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"auth file {path} is not valid TOML: {exc}") from None
    _reject_unknown(data, {"aggregator", "clients"}, f"auth file {path}")
    aggregator = _table(data, "aggregator", path)
    _reject_unknown(aggregator, {"user", "password"}, f"{path} [aggregator]")
    if "user" not in aggregator or "password" not in aggregator:
        raise ConfigError(f"{path} [aggregator] needs both `user` and `password`")
    clients = _table(data, "clients", path)
    if not clients:
        raise ConfigError(f"{path} [clients] lists no clients")
    try:
        return MosquittoUsers((aggregator["user"], aggregator["password"]), dict(clients))
    except ConfigError as exc:
        raise ConfigError(f"auth file {path}: {exc}") from None


def _table(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """A required TOML table."""
    value = data.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"auth file {path} needs a [{name}] table")
    return value


def _reject_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    """Typos must not pass silently."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected {sorted(known)}")


# ---------------------------------------------------------------- mosquitto configuration


def _find_exe(name: str) -> str | None:
    """An executable on PATH or in the sbin directories (mosquitto lives in /usr/sbin)."""
    extra = os.pathsep.join(SBIN_DIRS)
    return shutil.which(name) or shutil.which(name, path=extra)


def mosquitto_available() -> bool:
    """Whether the mosquitto broker and mosquitto_passwd are installed."""
    return _find_exe("mosquitto") is not None and _find_exe("mosquitto_passwd") is not None


def _need_exe(name: str) -> str:
    exe = _find_exe(name)
    if exe is None:
        raise BrokerError(f"{name} is not installed (apt-get install mosquitto mosquitto-clients)")
    return exe


def _run(cmd: list[str], what: str) -> None:
    """Run a helper tool (bounded); BrokerError with its stderr on failure."""
    try:
        subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise BrokerError(f"{what} failed: {exc.stderr.strip()[-2000:]}") from None
    except subprocess.TimeoutExpired:
        raise BrokerError(f"{what} timed out") from None


def _mosquitto_ids() -> tuple[int, int] | None:
    """(uid, gid) mosquitto drops to when started as root; None when it won't drop."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        log.warning("running as root but no `mosquitto` user exists; mosquitto will use nobody")
        return None
    return entry.pw_uid, entry.pw_gid


def _check_traversable(directory: Path, ids: tuple[int, int]) -> None:
    """Every ancestor must let the mosquitto user through, or it cannot read its own files."""
    uid, gid = ids
    for parent in directory.parents:
        st = parent.stat()
        if st.st_uid == uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid == gid and st.st_mode & stat.S_IXGRP:
            continue
        if not st.st_mode & stat.S_IXOTH:
            raise BrokerError(
                f"mosquitto drops to user `mosquitto`, which cannot enter {parent} "
                f"(mode {stat.S_IMODE(st.st_mode):o}); use a directory under a traversable path"
            )


def _hand_over(paths: list[Path], ids: tuple[int, int] | None) -> None:
    """Give the broker's files to the mosquitto user (no-op when not root)."""
    if ids is None:
        return
    for path in paths:
        os.chown(path, *ids)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def acl_text(users: MosquittoUsers, prefix: str = "fedsb") -> str:
    """The ACL: the aggregator owns `{prefix}/#`; a client writes only its own topics.

    Writes use `%u` patterns; reads are listed per client (mosquitto warns on patterns without
    `%u`/`%c`, and plain `topic` lines before any `user` line would apply to anonymous only).
    """
    leaves = ("manifest", "adapter/+", "round", "global", "init/request", "init/request/+")
    reads = [f"{prefix}/+/{leaf}" for leaf in leaves]
    lines = [
        "# generated by fedsb.aggregator.broker; %u is the client's user name (= client id)",
        f"pattern write {prefix}/+/update/%u",
        f"pattern write {prefix}/+/status/%u",
        f"pattern write {prefix}/+/init/reply/%u",  # federated inits
        "",
        f"user {users.aggregator[0]}",
        f"topic readwrite {prefix}/#",
    ]
    for client in sorted(users.clients):
        lines += ["", f"user {client}", *(f"topic read {topic}" for topic in reads)]
    return "\n".join([*lines, ""])


def _write_passwords(path: Path, users: MosquittoUsers) -> Path:
    """Hash the passwords with `mosquitto_passwd -U` (passwords never appear on a command line)."""
    lines = "".join(f"{user}:{password}\n" for user, password in users.all().items())
    _write(path, lines, 0o600)
    _run([_need_exe("mosquitto_passwd"), "-U", str(path)], "mosquitto_passwd -U")
    return path


SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def write_tls_files(directory: Path, days: int = 825) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server cert for 127.0.0.1/localhost → (ca.crt, server.crt, server.key).

    The CA's key is deleted after signing, so no one can mint further certificates from it.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError("the openssl command is needed to create TLS certificates")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = _write(directory / "server.ext", SERVER_EXT)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE"]
    ca_ext += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    ca_cmd = [openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt)]
    _run([*ca_cmd, "-days", str(days), "-subj", "/CN=fedsb local CA", *ca_ext], "openssl CA")
    csr_cmd = [openssl, "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"]
    _run(csr_cmd, "openssl server key")
    serial = f"0x{secrets.token_hex(16)}"
    sign = [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key)]
    sign += ["-set_serial", serial, "-days", str(days), "-extfile", str(ext), "-out", str(crt)]
    _run(sign, "openssl sign server certificate")
    for leftover in (ca_key, csr, ext):
        leftover.unlink()
    key.chmod(0o600)
    ca_crt.chmod(0o644)
    crt.chmod(0o644)
    return ca_crt, crt, key


def write_mosquitto_config(
    directory: Path,
    *,
    port: int,
    users: MosquittoUsers | None = None,
    tls: bool = False,
    prefix: str = "fedsb",
    max_packet_size: int = 16 * 2**20,
    persistence: bool = True,
) -> Path:
    """Write mosquitto.conf (plus password, ACL and TLS files) into `directory`; returns its path.

    Listens on 127.0.0.1:`port` only; anonymous access is allowed only when `users` is None.
    `directory` becomes mode 755 and, when run as root, is handed to the `mosquitto` user.
    """
    if not PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"topic prefix {prefix!r} must be levels of [A-Za-z0-9_.-]")
    if not 0 < max_packet_size <= MAX_MQTT_PACKET:
        raise ConfigError(f"max_packet_size must be in 1..{MAX_MQTT_PACKET}, got {max_packet_size}")
    if not 0 < port < 65536:
        raise ConfigError(f"port must be in 1..65535, got {port}")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    ids = _mosquitto_ids()
    if ids is not None:
        _check_traversable(directory, ids)
    owned = [directory]
    lines = [
        "# generated by fedsb.aggregator.broker",
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
    ]
    if tls:
        ca, crt, key = write_tls_files(directory)
        owned += [ca, crt, key]
        lines += [f"cafile {ca}", f"certfile {crt}", f"keyfile {key}", "tls_version tlsv1.2"]
    lines.append(f"allow_anonymous {'false' if users else 'true'}")
    if users is not None:
        passwd = _write_passwords(directory / "passwd", users)
        acl = _write(directory / "acl", acl_text(users, prefix))
        owned += [passwd, acl]
        lines += [f"password_file {passwd}", f"acl_file {acl}"]
    lines += _persistence_lines(directory, persistence, owned)
    log_file = _write(directory / "mosquitto.log", "")
    owned.append(log_file)
    lines += [
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"max_packet_size {max_packet_size}",
        # The aggregator acknowledges an update only once it is spooled, so a round's updates
        # wait in the broker: its default queue of 1,000 per client would drop the rest.
        "max_queued_messages 100000",
        "max_inflight_messages 200",
        "",
    ]
    config = _write(directory / "mosquitto.conf", "\n".join(lines))
    _hand_over([*owned, config], ids)
    log.info("wrote mosquitto config %s (port %d, tls=%s, auth=%s)", config, port, tls, bool(users))
    return config


def _persistence_lines(directory: Path, persistence: bool, owned: list[Path]) -> list[str]:
    """Persistence settings; the store lives in `directory/persistence/`."""
    if not persistence:
        return ["persistence false"]
    store = directory / "persistence"
    store.mkdir(exist_ok=True)
    owned.append(store)
    return ["persistence true", f"persistence_location {store}/", "autosave_interval 60"]


# ---------------------------------------------------------------- running mosquitto


@dataclass
class _ConfSummary:
    """What start_mosquitto needs to know from a mosquitto.conf."""

    host: str
    port: int
    ca_file: Path | None
    tls: bool
    log_file: Path | None


def _read_config(config: Path) -> _ConfSummary:
    """Find the single listener, the TLS files and the log file in a mosquitto.conf."""
    try:
        text = config.read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerError(f"cannot read mosquitto config {config}: {exc}") from None
    listeners: list[list[str]] = []
    values: dict[str, str] = {}
    for raw in text.splitlines():
        words = raw.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        rest = words[1].strip() if len(words) > 1 else ""
        if words[0] == "listener":
            listeners.append(rest.split())
        elif words[0] in ("cafile", "certfile", "log_dest"):
            values[words[0]] = rest
    if len(listeners) != 1 or len(listeners[0]) != 2:
        raise BrokerError(f"{config} must have exactly one `listener PORT 127.0.0.1` line")
    port, host = listeners[0]
    _require_loopback(host)
    if not port.isdigit():
        raise BrokerError(f"{config}: listener port {port!r} is not a number")
    log_dest = values.get("log_dest", "").split(None, 1)
    return _ConfSummary(
        host="127.0.0.1" if host == "localhost" else host,
        port=int(port),
        ca_file=Path(values["cafile"]) if "cafile" in values else None,
        tls="certfile" in values,
        log_file=Path(log_dest[1]) if len(log_dest) == 2 and log_dest[0] == "file" else None,
    )


class _MosquittoProcess:
    """A mosquitto child process, its stderr file and its log position."""

    def __init__(self, config: Path, summary: _ConfSummary) -> None:
        self.summary = summary
        self.stderr_path = config.parent / "mosquitto.stderr"
        self.log_start = _size(summary.log_file)
        self.stderr: IO[bytes] = open(self.stderr_path, "wb")  # closed in stop()
        try:
            cmd = [_need_exe("mosquitto"), "-c", str(config)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr)
        except BaseException:
            self.stderr.close()
            raise

    def running(self) -> bool:
        """Whether mosquitto logged that it is running (listeners open) this time round."""
        return " running" in self._log_since_start()

    def _log_since_start(self) -> str:
        log_file = self.summary.log_file
        if log_file is None or not log_file.exists():
            return ""
        with open(log_file, "rb") as fh:
            fh.seek(self.log_start)
            return fh.read().decode("utf-8", "replace")

    def tail(self, lines: int = 15) -> str:
        """The last lines of this run's log and stderr, for error messages."""
        text = self._log_since_start()
        with contextlib.suppress(OSError):
            text += self.stderr_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate by PID, wait up to 5 s, then kill."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto (pid %d) ignored SIGTERM; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait(STOP_WAIT_S)
        self.stderr.close()
        log.info("mosquitto (pid %d) stopped with code %s", self.proc.pid, self.proc.returncode)


def _wait_until_running(child: _MosquittoProcess, deadline: float) -> None:
    """Ready once the log says "running" (listeners are open by then); else probe the port.

    The log avoids a TCP probe, which on a TLS listener leaves an "unexpected eof" line.
    """
    host, port = child.summary.host, child.summary.port
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with code {child.proc.returncode}")
        if child.running() if child.summary.log_file else _port_accepts(host, port):
            return
        time.sleep(0.05)
    raise BrokerError(f"mosquitto did not accept connections on {host}:{port} in time")


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def start_mosquitto(config: Path, *, timeout_s: float = 10) -> BrokerHandle:
    """Start mosquitto with `config` and return once it accepts connections on 127.0.0.1."""
    config = Path(config).resolve()
    summary = _read_config(config)
    child = _MosquittoProcess(config, summary)
    deadline = time.monotonic() + timeout_s
    try:
        _wait_until_running(child, deadline)
    except BrokerError as exc:
        child.stop()
        raise BrokerError(f"{exc}; mosquitto said:\n{child.tail()}") from None
    scheme = "mqtts" if summary.tls else "mqtt"
    log.info("mosquitto (pid %d) listening on %s:%d", child.proc.pid, summary.host, summary.port)
    return BrokerHandle(
        url=f"{scheme}://{summary.host}:{summary.port}",
        host=summary.host,
        port=summary.port,
        ca_file=summary.ca_file,
        kind="mosquitto",
        _stopper=child.stop,
    )
