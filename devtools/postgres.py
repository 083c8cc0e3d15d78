"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temporary directory, listening
only on a Unix socket, run as the ``postgres`` user when we are root (the server refuses to run as root).

    cluster = Cluster.create()          # initdb + start, ~1-2 s
    url = cluster.create_database()     # a fresh, empty database: postgresql://postgres@/db_...?host=...
    cluster.restart(); cluster.destroy()
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

START_TIMEOUT = 30


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (install Debian's `postgresql`)."""


def server_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<major>/bin)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable("PostgreSQL's initdb was not found: install it (apt-get install postgresql)")


class Cluster:
    """One PostgreSQL server of our own in ``directory``; ``url(name)`` reaches a database over its socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.socket_dir = directory / "run"
        self.log_path = directory / "postgres.log"
        self.bindir = server_bindir()
        self._owner = "postgres" if os.geteuid() == 0 else None

    @classmethod
    def create(cls, parent: str | None = None) -> Cluster:
        """A new cluster in a fresh temporary directory, started."""
        # Not under pytest's tmp_path: its parents are 0700 root, which the postgres user cannot cross.
        directory = Path(tempfile.mkdtemp(prefix="orch-pg-", dir=parent))
        cluster = cls(directory)
        cluster.initdb()
        cluster.start()
        return cluster

    def initdb(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._owner:
            user = pwd.getpwnam(self._owner)
            os.chmod(self.directory, 0o755)
            for path in (self.directory, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                  "--locale", "C.UTF-8")

    def start(self) -> None:
        options = (f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path), "-w",
                  "-t", str(START_TIMEOUT), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no checkpoint, clients cut off)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pid(self) -> int:
        """The postmaster's process id (its children are the backends: count them for CPU time)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or "db_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / tool), *args]
        if self._owner:
            argv = ["runuser", "-u", self._owner, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{self.log()[-2000:]}")
        return result
