"""The declarative Base with a naming convention, and the engine and session factories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import DateTime, MetaData, func
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.errors import is_infrastructure_error
from app.settings import DatabaseSettings

Row = TypeVar("Row")
Key = TypeVar("Key")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Timestamped:
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    return create_async_engine(
        settings.url.get_secret_value(),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.timeout_s,
        # No pre-ping (three round trips per checkout): a connection that died fails its first
        # statement instead, which answers 503 / holds the device request for a retry, and
        # SQLAlchemy then invalidates the pool (decisions.md).
        connect_args={
            "timeout": settings.timeout_s,
            "command_timeout": settings.timeout_s * 6,
            "server_settings": {"application_name": "swarm-core"},
        },
    )


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    """The same database as a plain asyncpg DSN (for raw connections outside the engine)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def autocommit(session: AsyncSession) -> None:
    """Let each statement of this session commit on its own: work that is one statement then
    costs one database round trip instead of three (BEGIN, statement, COMMIT)."""
    await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


# What services take to open their own transactions.
Sessions = async_sessionmaker[AsyncSession]


def create_sessionmaker(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)


async def change_each(
    session: AsyncSession,
    rows: Sequence[Row],
    change: Callable[[Row], None],
    key: Callable[[Row], Key],
    failed: Callable[[Key, Exception], None],
) -> list[Row]:
    """Apply `change` to the (locked) ORM rows and flush them together; if that fails for a reason
    other than the infrastructure, row by row, each in its own savepoint: the key of a row that
    fails alone is handed to `failed` and the row left as it was, the others go on. Returns the
    rows changed; the caller commits."""
    # Read now: a failed savepoint expires what it touched, and an async session cannot reload
    # an attribute on access.
    keys = [key(row) for row in rows]
    try:
        async with session.begin_nested():
            for row in rows:
                change(row)
            await session.flush()
        return list(rows)
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise
    changed: list[Row] = []
    for row, row_key in zip(rows, keys, strict=True):
        try:
            async with session.begin_nested():
                # The failed savepoint expired what it touched: read the row again (still locked).
                await session.refresh(row)
                change(row)
                await session.flush()
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            failed(row_key, exc)
        else:
            changed.append(row)
    return changed
