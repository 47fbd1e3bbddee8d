"""Settings shared by every test.

Property-based tests (hypothesis) run derandomized and without an example database: the same
examples on every run and every machine, so CI never turns red on a run of luck and a failure
seen once is seen again. ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples on each run,
for a local search for new counterexamples (each test keeps its own ``max_examples``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_PROFILE = dict(database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, **_PROFILE)
settings.register_profile("explore", derandomize=False, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- a real PostgreSQL -----------------------------------------------------------------------------
#
# Tests of the PostgreSQL state backend talk to a real server: NHI_TEST_POSTGRES_URL when set, else
# the local server at 127.0.0.1:5432 when one answers, else a private throwaway cluster started
# with Debian's postgresql binaries (initdb + pg_ctl) in a temporary directory and stopped after.
# NHI_TEST_POSTGRES=private forces the private cluster. Each test session gets a database of its
# own (nhi_test_<random>), dropped after. In CI (CI set) a missing PostgreSQL fails; elsewhere
# the tests that need one are skipped, saying why. The benchmark finds its server the same way
# (nhi_gateway.bench.postgres), without the private cluster.

import contextlib  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from nhi_gateway.bench.postgres import configured_server, create_database, drop_database  # noqa: E402

from .support.missing import missing  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _private_cluster():
    """A throwaway cluster in a temporary directory, on a free loopback port, trust auth."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        yield None
        return
    bindir = Path(initdbs[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="nhi-pg-"))
    data, port = root / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as Debian's postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        try:
            shutil.chown(root, "postgres")
        except (LookupError, OSError):
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError("PostgreSQL's binaries are installed but there is no 'postgres' user to run "
                               "a private cluster as (initdb refuses root)") from None
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start"], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start a private PostgreSQL cluster: {e}: "
                           f"{getattr(e, 'stderr', b'')!r}") from e
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A URL of a PostgreSQL server the tests may create databases on."""
    if os.environ.get("NHI_TEST_POSTGRES") != "private":
        url = configured_server()
        if url:
            yield url
            return
    with _private_cluster() as private:
        if private is None:
            message = ("no PostgreSQL: set NHI_TEST_POSTGRES_URL, run one at 127.0.0.1:5432, "
                       "or install Debian's postgresql package")
            missing(message)
        yield private


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """A fresh database of this test session (nhi_test_<random>), dropped after."""
    import psycopg

    try:
        name, url = create_database(postgres_server, "nhi_test_")
    except psycopg.Error as e:
        from nhi_gateway.approvals.postgres import describe  # the server, never a password

        message = f"PostgreSQL at {describe(postgres_server)} refused a test database: {e}"
        missing(message)
    try:
        yield url
    finally:
        drop_database(postgres_server, name)
