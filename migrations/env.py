"""Alembic environment of the tdstore catalogue.

tdstore runs migrations itself (``tdstore.open`` and ``tdstore migrate``), handing the
connection in through ``config.attributes["connection"]``; running ``alembic`` by hand
with ``-x url=sqlite:///path/catalog.sqlite`` works too.
"""

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from tdstore.storage.catalog import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    with create_engine(url).connect() as conn:
        _run(conn)
        conn.commit()
