"""A modern ClickHouse server for the tests, made of chDB's embedded engine.

    python tests/support/chdb_server.py DIRECTORY SECONDS

chDB (a PyPI package) embeds ClickHouse 26.x with clickhouse-local's
`SYSTEM START LISTEN TCP`, which serves the native protocol from inside the
process. Through `chdb.connect()` that statement fails ("start_servers_callback
is not set"): connections are built without listeners. chDB's one-shot
`_chdb.query()` runs clickhouse-local's full main instead, which can start
them, reading `config.xml` from the working directory (port, listen host,
logs). Its listeners live as long as that one call, so the call starts TCP
and then sleeps: the server answers for SECONDS (a safety net: the tests
stop it long before) and is gone when the process exits.

DIRECTORY holds config.xml (written by `tests.support.native_server.chdb_server`)
and gets the data in DIRECTORY/data.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    directory, seconds = sys.argv[1], int(sys.argv[2])
    os.chdir(directory)
    from chdb import _chdb  # imported here: chDB changes directory while it loads

    # One row per block, each sleeping 1 s: a query that runs SECONDS seconds
    # while the listener started before it serves other connections.
    _chdb.query(
        "SYSTEM START LISTEN TCP; "
        f"SELECT max(sleepEachRow(1)) FROM numbers({seconds}) SETTINGS max_block_size = 1",
        "CSV",
        path=os.path.join(directory, "data"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
