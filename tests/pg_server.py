"""A throwaway PostgreSQL server on loopback for the distributed-study test.

Uses the Debian server binaries (/usr/lib/postgresql/<version>/bin: initdb,
pg_ctl). PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` system user (created by the Debian package), in a data folder that
user owns. Without the binaries the test is skipped, except under CI=true,
where it fails: CI must install them (Debian package postgresql).
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import pytest


def find_bin_dir():
    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(path, "initdb"), os.X_OK) and os.access(os.path.join(path, "pg_ctl"), os.X_OK):
            return path
    found = shutil.which("pg_ctl")
    return os.path.dirname(found) if found and shutil.which("initdb") else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user():
    """(argv prefix, uid, gid) to run the server binaries as a non-root user."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no `postgres` user to run PostgreSQL as "
                    "(the Debian package postgresql creates it)")
    return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid


def _run(argv, what):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout[-2000:]} {result.stderr[-2000:]}")


class Server:
    """start() -> URL; stop() removes everything."""

    def __init__(self, bin_dir):
        self.bin_dir, self.port = bin_dir, _free_port()
        self.prefix, uid, gid = _server_user()
        # pytest's tmp_path is private to root; the server user needs its own folder.
        self.root = tempfile.mkdtemp(prefix="hptuning-pg-")
        if uid is not None:
            os.chown(self.root, uid, gid)
        self.data = os.path.join(self.root, "data")

    def start(self):
        _run([*self.prefix, os.path.join(self.bin_dir, "initdb"), "-D", self.data, "-U", "postgres",
              "--auth=trust", "--no-sync", "-E", "UTF8"], "initdb")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        _run([*self.prefix, os.path.join(self.bin_dir, "pg_ctl"), "-D", self.data, "-o", options,
              "-l", os.path.join(self.root, "server.log"), "-w", "-t", "60", "start"], "pg_ctl start")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run([*self.prefix, os.path.join(self.bin_dir, "pg_ctl"), "-D", self.data, "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres_url():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message + " (CI must run this test, so it fails instead of skipping)")
        pytest.skip(message)
    server = Server(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()
