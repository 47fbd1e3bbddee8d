"""A PostgreSQL server for the developer tools: the tests (``tests/conftest.py``) and the benchmark
find it the same way, ``NHI_TEST_POSTGRES_URL`` when set, else the local server at 127.0.0.1:5432
when one answers, and each run works in a database of its own, created for it and dropped after.

Plain Python: no mitmproxy import.
"""

from __future__ import annotations

import os
import secrets
import socket
from urllib.parse import urlsplit

ENV_URL = "NHI_TEST_POSTGRES_URL"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
WHERE_TO_FIND = f"set {ENV_URL} or run one at 127.0.0.1:5432"


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def configured_server() -> str | None:
    """``NHI_TEST_POSTGRES_URL``, else the local server when it answers, else None."""
    url = os.environ.get(ENV_URL)
    if url:
        return url
    return LOCAL_POSTGRES if answers("127.0.0.1", 5432) else None


def database_url(server: str, name: str) -> str:
    """``server`` (a URL, as the gateway's ``--state`` takes it, or a libpq conninfo), naming
    database ``name`` instead."""
    if "://" in server:
        return urlsplit(server)._replace(path="/" + name).geturl()
    from psycopg.conninfo import make_conninfo

    return make_conninfo(server, dbname=name)


def create_database(server: str, prefix: str) -> tuple[str, str]:
    """A new empty database ``<prefix><random>``: (its name, its URL). Raises psycopg.Error."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, database_url(server, name)


def drop_database(server: str, name: str) -> None:
    """Drop ``name``, closing whatever connections are still in it. Raises psycopg.Error."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
