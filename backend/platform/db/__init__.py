"""The database room, one concern a file.

- `engine`: the engine and pool, and the connection hygiene that keeps pooled connections fit;
- `deadline`: psycopg2's wait callback, so that no wait on the database is unbounded;
- `cancel`: cancelling a statement the service has given up on (at the wait's deadline);
- `reachable`: refusing to start, with the reason, when a configured database cannot be reached;
- `runner`: `Database`, which runs the slices' handlers on the event loop and ends their unit
  of work;
- `schema`: waiting for the database at start-up;
- `migrate` (with the revisions in `migrations/`): the schema's history, and bringing a database
  to its head at start-up or from the `alembic` command line.
"""

from backend.platform.db.engine import (
    build_engine,
    close_pool,
    database_answers,
    quote_identifier,
    transactional,
)
from backend.platform.db.runner import Database, database_of
from backend.platform.db.schema import wait_for_database

__all__ = [
    "Database",
    "build_engine",
    "close_pool",
    "database_answers",
    "database_of",
    "quote_identifier",
    "transactional",
    "wait_for_database",
]
