"""A private PostgreSQL cluster for tests: initdb + pg_ctl in a temp dir, on a unix socket only.

Started the way the suites start mosquitto: a real server, no network port, gone afterwards.
As root the cluster runs as user ``postgres`` (PostgreSQL refuses to run as root).
Skips without PostgreSQL, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def find_bin() -> Path | None:
    for folder in BIN_DIRS:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PrivatePostgres:
    def __init__(self) -> None:
        bin_dir = find_bin()
        if bin_dir is None:
            if os.environ.get("CI") == "true":
                pytest.fail("PostgreSQL missing in CI")
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bin_dir
        # Its own folder under /tmp: pytest's tmp_path is private to root, and user postgres
        # must reach the data and socket directories.
        self.dir = workdir = Path(tempfile.mkdtemp(prefix="car-agent-pg-"))
        self.data = workdir / "data"
        self.socket_dir = workdir / "socket"
        self.log = workdir / "postgres.log"
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
        self.role = self.user.pw_name if self.user else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        try:
            return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "LC_ALL": "C.UTF-8"}, cwd=self.dir,
                                  **kwargs)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"{Path(args[0]).name} failed: {exc.stderr.strip()}") from None

    def start(self) -> "PrivatePostgres":
        self.socket_dir.mkdir(parents=True)
        if self.user is not None:
            for path in (self.dir, self.socket_dir):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
            self.dir.chmod(0o755)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-E", "UTF8",
                  "--no-sync", "-U", self.role)
        return self.resume()

    def resume(self) -> "PrivatePostgres":
        """Start the server (again, after :meth:`halt`)."""
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                      "-t", "60", "start", "-o",
                      f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} "
                      "-c fsync=off -c max_connections=50")
        except RuntimeError as exc:
            text = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{exc}\n{text[-4000:]}") from None
        return self

    def create_database(self, name: str) -> str:
        self._run(str(self.bin / "createdb"), "-h", str(self.socket_dir), "-U", self.role, name)
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.role}@/{database}?host={self.socket_dir}"

    def halt(self) -> None:
        """Stop the server at once (connections cut), keeping its data."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        """Stop the server and remove everything."""
        if self.data.exists():
            try:
                self.halt()
            except RuntimeError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
