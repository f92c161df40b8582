"""Reading and writing the served-models registry.

Every write is a short transaction. Deployments to one endpoint are serialised by a *lease* on the
endpoint row (an atomic conditional UPDATE), not by a long database transaction, so the registry
stays writable while a model loads; a lease whose holder died on this host is taken over at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from airflow_provider_modeldeploy import config
from airflow_provider_modeldeploy.exceptions import (
    EndpointBusyError,
    InvalidParameterError,
    RegistryUnavailableError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.registry.models import endpoints, events, services, utcnow
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

# Kept equal to the files in migrations/versions (a test checks it), so that a process can tell the
# schema is current, older or newer with one query and without importing Alembic.
REVISIONS = ("0001", "0002")
HEAD_REVISION = REVISIONS[-1]
VERSION_TABLE = "modeldeploy_alembic_version"
_MIGRATION_LOCK_KEY = 0x6D6F64656C  # "model", for pg_advisory_lock
_SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite connection waits for another's lock

_RECORD_FIELDS = [f.name for f in fields(ServiceRecord)]
HOSTNAME = socket.gethostname()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


#: The tables' columns, as ``S.uuid``, ``E.name``, ``V.created_at``.
S, E, V = services.c, endpoints.c, events.c


def row_to_record(row: Row[Any]) -> ServiceRecord:
    data = {name: getattr(row, name) for name in _RECORD_FIELDS}
    data["state"] = ServiceState(row.state)
    data["config"] = dict(row.config or {})
    data["created_at"] = _aware(row.created_at)
    data["updated_at"] = _aware(row.updated_at)
    return ServiceRecord(**data)


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable registry URL>"


@dataclass
class EndpointLease:
    backend: str
    name: str
    owner: str
    created: bool
    address: dict[str, Any]


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """The served-models table and its companions (endpoints, history), in one database."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or config.registry_url()
        self._engine: Engine | None = None
        self._schema_ready = False

    # -- connection ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> Engine:
        try:
            if self.url.startswith("sqlite"):
                path = self.url.split("///", 1)[-1]
                if path and path != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
                    # Created private: it holds lineage and error messages, and the agents' addresses.
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                engine = create_engine(self.url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT})
                _make_sqlite_serialisable(engine)
            else:
                engine = create_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=4)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise RegistryUnavailableError(
                f"registry_sql_alchemy_conn={safe_url(self.url)!r}: cannot use this database URL ({exc})"
            ) from None
        return engine

    @contextlib.contextmanager
    def session(self) -> Iterator[Connection]:
        """One short transaction (committed at the end, rolled back on an error)."""
        self.ensure_schema()
        try:
            with self.engine.begin() as session:
                yield session
        except OperationalError as exc:
            raise RegistryUnavailableError(
                f"registry_sql_alchemy_conn={safe_url(self.url)!r}: database unreachable "
                f"({str(exc.orig).strip().splitlines()[0] if exc.orig else exc})"
            ) from None

    @property
    def upgrades_itself(self) -> bool:
        """Whether first use creates or upgrades the tables: the zero-configuration SQLite file, and a
        shared database only when ``[modeldeploy] registry_auto_upgrade`` says so. Otherwise a request
        (in the API server, a task) never migrates a database that other hosts use: ``airflow
        served-models db-upgrade`` does, as a deployment step."""
        if self.url.startswith("sqlite"):
            return True
        return config.get_option("registry_auto_upgrade", "False").strip().lower() in ("true", "1", "yes")

    def ensure_schema(self) -> None:
        """Check the tables' revision, once per process; create or upgrade them where this process may
        (see ``upgrades_itself``), else say what to run."""
        if self._schema_ready:
            return
        self.upgrade(check_only=not self.upgrades_itself)
        self._schema_ready = True

    def upgrade(self, check_only: bool = False) -> tuple[str | None, str]:
        """Bring the tables to this provider's revision (Alembic), safely under concurrency; the
        revisions before and after. A schema newer than this provider's is never touched."""
        engine = self.engine
        try:
            current = self._current_revision(engine)
            where = f"registry_sql_alchemy_conn={safe_url(self.url)!r}"
            if current is not None and current not in REVISIONS:
                raise RegistryUnavailableError(
                    f"{where}: the registry's schema is at revision {current!r}, newer than this provider's "
                    f"{HEAD_REVISION!r}: install the same airflow-provider-modeldeploy version on every host"
                )
            if current != HEAD_REVISION:
                if check_only:
                    raise RegistryUnavailableError(
                        f"{where}: the registry's schema is at revision {current or 'none (no tables)'!r} and "
                        f"this provider needs {HEAD_REVISION!r}: run 'airflow served-models db-upgrade'"
                    )
                self._upgrade(engine)
        except OperationalError as exc:
            raise RegistryUnavailableError(
                f"registry_sql_alchemy_conn={safe_url(self.url)!r}: database unreachable "
                f"({str(exc.orig).strip().splitlines()[0] if exc.orig else exc})"
            ) from None
        self._schema_ready = True
        return current, HEAD_REVISION

    @staticmethod
    def _current_revision(engine: Engine) -> str | None:
        with engine.connect() as conn:
            try:
                return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
            except (OperationalError, SQLAlchemyError) as exc:
                if "no such table" in str(exc) or "does not exist" in str(exc) or "UndefinedTable" in str(exc):
                    return None
                raise

    @staticmethod
    def _upgrade(engine: Engine) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", "airflow_provider_modeldeploy:registry/migrations")
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            # On SQLite the transaction began IMMEDIATE: concurrent upgrades queue here, and the
            # later ones find the schema current inside their own transaction.
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    # -- services --------------------------------------------------------------------------------

    def add_service(self, record: ServiceRecord) -> ServiceRecord:
        values = record.to_dict()
        values["state"] = str(record.state)
        values["created_at"] = values["updated_at"] = utcnow()
        with self.session() as s:
            s.execute(insert(services).values(**values))
        return self.get_service(record.uuid)

    def get_service(self, service_uuid: str) -> ServiceRecord:
        with self.session() as s:
            row = s.execute(select(services).where(S.uuid == service_uuid)).one_or_none()
            if row is None:
                matches = s.execute(
                    select(services).where(S.uuid.startswith(service_uuid, autoescape=True)).order_by(S.uuid).limit(6)
                ).all()
                if len(service_uuid) >= 4 and len(matches) == 1:
                    row = matches[0]
                elif len(service_uuid) >= 4 and matches:
                    # Which ones, so that the user can type one more character instead of guessing.
                    names = ", ".join(f"{m.uuid} ({m.model_name}, {m.state})" for m in matches[:5])
                    more = " and more" if len(matches) > 5 else ""
                    raise ServiceNotFoundError(
                        "uuid", service_uuid, f"is the start of several services' uuids: {names}{more}; give more of it"
                    )
                else:
                    raise ServiceNotFoundError("uuid", service_uuid, "no served model has this uuid")
            return row_to_record(row)

    def update_service(self, service_uuid: str, **values: Any) -> ServiceRecord:
        if "state" in values:
            values["state"] = str(values["state"])
        values["updated_at"] = utcnow()
        with self.session() as s:
            result = s.execute(update(services).where(S.uuid == service_uuid).values(**values))
            if result.rowcount == 0:
                raise ServiceNotFoundError("uuid", service_uuid, "no served model has this uuid")
        return self.get_service(service_uuid)

    def delete_service(self, service_uuid: str) -> None:
        with self.session() as s:
            s.execute(delete(services).where(S.uuid == service_uuid))

    def find_services(
        self,
        *,
        backend: str | None = None,
        endpoint: str | None = None,
        model_name: str | None = None,
        dag_id: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        states: Sequence[ServiceState] | None = None,
        service_uuid: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ServiceRecord]:
        query = select(services)
        for column, value in (
            (S.backend, backend),
            (S.endpoint, endpoint),
            (S.model_name, model_name),
            (S.dag_id, dag_id),
            (S.task_id, task_id),
            (S.run_id, run_id),
        ):
            if value is not None:
                query = query.where(column == value)
        if service_uuid is not None:
            query = query.where(S.uuid.startswith(service_uuid, autoescape=True))
        if states is not None:
            query = query.where(S.state.in_([str(s) for s in states]))
        query = query.order_by(S.updated_at.desc(), S.uuid).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self.session() as s:
            return [row_to_record(row) for row in s.execute(query)]

    #: Columns a page of services may be sorted by (all indexed or cheap at 10,000 rows).
    SORTABLE = ("updated_at", "created_at", "model_name", "model_version", "state", "backend", "endpoint", "dag_id")

    def page_services(
        self,
        *,
        model: str | None = None,
        dag_id: str | None = None,
        states: Sequence[ServiceState] | None = None,
        backend: str | None = None,
        sort: str = "updated_at",
        descending: bool = True,
        limit: int = 25,
        offset: int = 0,
        only_dag_ids: Collection[str] | None = None,
        with_no_dag: bool = True,
    ) -> tuple[list[ServiceRecord], int]:
        """One page of services and the number matching, in two queries: for lists of any size.

        ``model`` and ``dag_id`` match substrings (case-insensitive) of the model name or endpoint and
        of the DAG id, as a person types them into a filter box. ``only_dag_ids``: only services those
        DAGs deployed (what a user may read), and those deployed outside a DAG if ``with_no_dag``;
        None: all services.
        """
        if sort not in self.SORTABLE:
            raise InvalidParameterError("sort", sort, f"must be one of {', '.join(self.SORTABLE)}")
        conditions = []
        if model:
            pattern = f"%{model.lower()}%"
            conditions.append(func.lower(S.model_name).like(pattern) | func.lower(S.endpoint).like(pattern))
        if dag_id:
            conditions.append(func.lower(S.dag_id).like(f"%{dag_id.lower()}%"))
        if states:
            conditions.append(S.state.in_([str(s) for s in states]))
        if backend:
            conditions.append(S.backend == backend)
        if only_dag_ids is not None:
            of_dags = S.dag_id.in_(sorted(only_dag_ids))
            conditions.append(of_dags | S.dag_id.is_(None) if with_no_dag else of_dags)
        column = S[sort]
        # uuid breaks ties so that pages never overlap nor skip rows.
        order = (column.desc(), S.uuid.desc()) if descending else (column.asc(), S.uuid.asc())
        query = select(services).where(*conditions).order_by(*order).offset(offset).limit(limit)
        with self.session() as s:
            total = int(s.scalar(select(func.count()).select_from(services).where(*conditions)) or 0)
            return [row_to_record(row) for row in s.execute(query)], total

    def dag_ids(self) -> set[str]:
        """The DAGs that deployed the services of the registry."""
        with self.session() as s:
            return set(s.scalars(select(S.dag_id).where(S.dag_id.is_not(None)).distinct()))

    def connection_ids(self) -> list[str]:
        """The deployer connections services were deployed through."""
        with self.session() as s:
            query = select(S.conn_id).where(S.conn_id.is_not(None)).distinct()
            return sorted(str(c) for c in s.scalars(query))

    def count_services(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(services)) or 0)

    def activate(self, service_uuid: str, *, retire: Sequence[str] = (), **values: Any) -> ServiceRecord:
        """In one transaction: delete the retired services and make this one the active one."""
        values.update(state=str(ServiceState.ACTIVE), last_error=None, updated_at=utcnow())
        try:
            with self.session() as s:
                if retire:
                    s.execute(delete(services).where(S.uuid.in_(list(retire))))
                s.execute(update(services).where(S.uuid == service_uuid).values(**values))
        except IntegrityError as exc:  # the one-active-per-endpoint index fired
            raise EndpointBusyError(
                f"uuid={service_uuid!r}: another server of this endpoint is active ({exc.orig})"
            ) from None
        return self.get_service(service_uuid)

    # -- endpoints and their lease ---------------------------------------------------------------

    def get_endpoint(self, backend: str, name: str) -> Row[Any] | None:
        """The endpoint's row (its columns as attributes), or None."""
        with self.session() as s:
            return s.execute(select(endpoints).where(E.backend == backend, E.name == name)).one_or_none()

    def set_endpoint_address(self, backend: str, name: str, address: dict[str, Any]) -> None:
        with self.session() as s:
            s.execute(update(endpoints).where(E.backend == backend, E.name == name).values(address=address))

    def delete_endpoint(self, backend: str, name: str) -> None:
        with self.session() as s:
            s.execute(delete(endpoints).where(E.backend == backend, E.name == name))

    def _create_endpoint(self, backend: str, name: str, conn_id: str | None) -> bool:
        try:
            with self.session() as s:
                s.execute(insert(endpoints).values(backend=backend, name=name, conn_id=conn_id, address={}))
            return True
        except IntegrityError:
            return False

    @contextlib.contextmanager
    def lease(
        self, backend: str, name: str, *, conn_id: str | None = None, ttl: float = 600, wait: float = 600
    ) -> Iterator[EndpointLease]:
        """Hold the endpoint for one deployment or lifecycle action. Waits for other holders."""
        owner = uuidlib.uuid4().hex
        created = self._create_endpoint(backend, name, conn_id)
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            if self._try_acquire(backend, name, owner, ttl):
                break
            if time.monotonic() > deadline:
                row = self.get_endpoint(backend, name)
                holder = f"{row.lock_host}:{row.lock_pid}" if row else "unknown"
                raise EndpointBusyError(
                    f"endpoint={name!r}: still held by another deployment ({holder}) after {wait:.0f}s"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        row = self.get_endpoint(backend, name)
        lease = EndpointLease(backend, name, owner, created, dict(row.address or {}) if row else {})
        # Renewed while held: a deployment may take longer than the TTL (a big model, a slow drain);
        # the TTL only bounds how long a holder that died keeps the endpoint.
        released = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(backend, name, owner, ttl, released), name=f"lease-{name}", daemon=True
        )
        renewer.start()
        try:
            yield lease
        finally:
            released.set()
            with contextlib.suppress(RegistryUnavailableError), self.session() as s:
                s.execute(
                    update(endpoints)
                    .where(E.backend == backend, E.name == name, E.lock_owner == owner)
                    .values(lock_owner=None, lock_host=None, lock_pid=None, lock_expires_at=None)
                )

    def lease_is_free(self, backend: str, name: str) -> bool:
        """Whether nobody holds the endpoint now (no holder, an expired one, or one of this host that
        died): what ``lease`` would take at once. Reads only."""
        row = self.get_endpoint(backend, name)
        if row is None or row.lock_owner is None:
            return True
        expires = _aware(row.lock_expires_at)
        if expires is not None and expires < utcnow():
            return True
        return row.lock_host == HOSTNAME and not _pid_alive(row.lock_pid)

    def _renew(self, backend: str, name: str, owner: str, ttl: float, released: threading.Event) -> None:
        while not released.wait(max(1.0, ttl / 3)):
            try:
                with self.session() as s:
                    s.execute(
                        update(endpoints)
                        .where(E.backend == backend, E.name == name, E.lock_owner == owner)
                        .values(lock_expires_at=utcnow() + timedelta(seconds=ttl))
                    )
            except Exception as exc:  # the next renewal tries again; the deployment goes on
                import logging

                logging.getLogger(__name__).warning("Could not renew the lease of endpoint %s: %s", name, exc)

    def _try_acquire(self, backend: str, name: str, owner: str, ttl: float) -> bool:
        now = utcnow()
        mine = dict(
            lock_owner=owner, lock_host=HOSTNAME, lock_pid=os.getpid(),
            lock_expires_at=now + timedelta(seconds=ttl),
        )  # fmt: skip
        key = (E.backend == backend, E.name == name)
        with self.session() as s:
            free = (E.lock_owner.is_(None)) | (E.lock_expires_at < now)
            if s.execute(update(endpoints).where(*key).where(free).values(**mine)).rowcount == 1:
                return True
            row = s.execute(select(E.lock_owner, E.lock_host, E.lock_pid).where(*key)).one_or_none()
            if row is None:
                raise ServiceNotFoundError("endpoint", name, "endpoint vanished while waiting for it")
            holder_owner, holder_host, holder_pid = row
            # A holder on this host whose process is gone (killed mid-deploy) gives the lease up now.
            if holder_host == HOSTNAME and holder_pid != os.getpid() and not _pid_alive(holder_pid):
                stolen = s.execute(update(endpoints).where(*key).where(E.lock_owner == holder_owner).values(**mine))
                return stolen.rowcount == 1
        return False

    # -- history ---------------------------------------------------------------------------------

    def add_event(
        self,
        backend: str,
        endpoint: str,
        action: str,
        *,
        outcome: str = "success",
        service_uuid: str | None = None,
        actor: str | None = None,
        message: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        with self.session() as s:
            s.execute(
                insert(events).values(
                    backend=backend, endpoint=endpoint, action=str(action), outcome=outcome,
                    service_uuid=service_uuid, actor=actor, message=message, details=details or {},
                )
            )  # fmt: skip

    def list_events(self, backend: str, endpoint: str, limit: int = 50) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.execute(
                select(events).where(V.backend == backend, V.endpoint == endpoint).order_by(V.id.desc()).limit(limit)
            ).all()
            return [
                {
                    "id": r.id, "action": r.action, "outcome": r.outcome, "service_uuid": r.service_uuid,
                    "actor": r.actor, "message": r.message, "details": r.details,
                    "created_at": _aware(r.created_at).isoformat() if r.created_at else None,
                }
                for r in rows
            ]  # fmt: skip


def _make_sqlite_serialisable(engine: Engine) -> None:
    """Every SQLite transaction takes the write lock up front (BEGIN IMMEDIATE).

    pysqlite's default deferred transactions upgrade to a write lock late, and in WAL mode such an
    upgrade fails at once with 'database is locked' instead of waiting on the busy timeout.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT * 1000}")
        _switch_to_wal(cur)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, waiting for other connections as the busy timeout would.

    Switching a new database file to WAL takes an exclusive lock without calling SQLite's busy
    handler: when several processes open the zero-configuration registry for the first time at once
    (tasks of a LocalExecutor, the CLI, the API server), all but one get 'database is locked' at once.
    """
    import sqlite3

    from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

    def locked(exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc)

    retry(
        retry=retry_if_exception(locked),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        stop=stop_after_delay(_SQLITE_BUSY_TIMEOUT),
        reraise=True,
    )(cursor.execute)("PRAGMA journal_mode=WAL")


_registries: dict[str, Registry] = {}
_registries_lock = threading.Lock()


def get_registry(url: str | None = None) -> Registry:
    """The process-wide registry for a URL (default: the configured one)."""
    url = url or config.registry_url()
    if not url or not isinstance(url, str):
        raise InvalidParameterError("registry_sql_alchemy_conn", url, "must be a SQLAlchemy URL")
    with _registries_lock:
        if url not in _registries:
            _registries[url] = Registry(url)
        return _registries[url]
