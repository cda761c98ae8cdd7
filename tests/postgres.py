"""The PostgreSQL server the tests may use (TAVERNKEEP_TEST_DATABASE_URL): a migrated template database,
and a database of its own for each test, copied from it.

Copying a template is a file copy on the server (tens of milliseconds), where migrating a database
anew takes several times that, and nothing of one test can leak into the next.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

from persistence import Database

URL_VARIABLE = "TAVERNKEEP_TEST_DATABASE_URL"
BACKENDS = ("sqlite", "postgresql")
SKIP_REASON = (
    f"PostgreSQL runs need {URL_VARIABLE}, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/postgres "
    "(a role that may create databases; `bash .ci/postgres start DIR` starts one, see the README)"
)


class PostgresServer:
    """A PostgreSQL server reached as a role that may create databases."""

    def __init__(self, url: URL) -> None:
        """Use the server of `url` (a postgresql+asyncpg URL); its database is where the admin work runs."""
        import asyncpg

        self.url = url
        self._loop = asyncio.new_event_loop()
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._conn: Any = self._loop.run_until_complete(asyncpg.connect(dsn))
        self._prefix = f"tavernkeep_test_{os.getpid()}"
        self._names = itertools.count()
        self._template = f"{self._prefix}_template"
        # Copying by files skips writing the copy to the WAL (PostgreSQL 15 and later).
        self._strategy = " STRATEGY FILE_COPY" if self._conn.get_server_version().major >= 15 else ""

    def _execute(self, statement: str) -> None:
        self._loop.run_until_complete(self._conn.execute(statement))

    def url_of(self, name: str) -> str:
        """The URL of database `name` on this server."""
        return self.url.set(database=name).render_as_string(hide_password=False)

    def create_template(self) -> None:
        """Create the template database and migrate it to head."""
        self._execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
        self._execute(f'CREATE DATABASE "{self._template}"')

        async def migrate() -> None:
            db = await Database.open(self.url_of(self._template))
            await db.close()

        asyncio.run(migrate())

    @contextmanager
    def database(self, *, empty: bool = False) -> Iterator[str]:
        """A new database (a copy of the migrated template, or `empty`) for the time inside; its URL."""
        name = f"{self._prefix}_{next(self._names)}"
        template = "template0" if empty else self._template
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{self._strategy}')
        try:
            yield self.url_of(name)
        finally:
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Drop the template and close the admin connection."""
        try:
            self._execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
        finally:
            self._loop.run_until_complete(self._conn.close())
            self._loop.close()


# Where the summary reports the skipped PostgreSQL runs, all at once (tests/conftest.py).
SKIP_LOCATION = (__file__, 0)


def configured_url() -> str | None:
    """The URL of the PostgreSQL server for the tests, if one is configured."""
    return os.environ.get(URL_VARIABLE) or None


@contextmanager
def open_test_server() -> Iterator[PostgresServer]:
    """The configured server with its template database; `pytest.skip` when none is configured."""
    url = configured_url()
    if url is None:
        pytest.skip(SKIP_REASON)
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != "asyncpg":
        raise pytest.UsageError(f"{URL_VARIABLE} must be a postgresql+asyncpg:// URL, not {parsed.drivername}")
    server = PostgresServer(parsed)
    try:
        server.create_template()
        yield server
    finally:
        server.close()
