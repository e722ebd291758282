"""Cancelling a statement the service has given up on, so that it cannot be applied later."""

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import psycopg2
import structlog

log = structlog.get_logger("backend.db")

# libpq's own cancel functions, reached through psycopg2's extension module (which links
# libpq, bundled or the system's). psycopg2's `connection.cancel()` holds the GIL while libpq
# opens a connection to the server, so on a silent network it would freeze the whole process;
# called through ctypes, libpq runs with the GIL released, in a thread of its own.
# The one use of a private module of a dependency in the service: no public API names the libpq
# psycopg2 runs on. pyproject.toml caps psycopg2 where this was proven, and a release that no
# longer exposes these functions fails here, at import, saying so.
try:
    _libpq = ctypes.CDLL(psycopg2._psycopg.__file__)  # type: ignore[attr-defined]
    _libpq.PQgetCancel  # noqa: B018 - looked up now, so that a missing symbol fails at import
except (AttributeError, OSError) as exc:
    raise ImportError(
        f"psycopg2 {psycopg2.__version__}: cannot reach libpq's cancel functions through its "
        f"C module ({exc}); backend/platform/db/cancel.py needs a psycopg2 release where it can"
    ) from exc
_libpq.PQgetCancel.restype = ctypes.c_void_p
_libpq.PQgetCancel.argtypes = [ctypes.c_void_p]
_libpq.PQcancel.restype = ctypes.c_int
_libpq.PQcancel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
_libpq.PQfreeCancel.restype = None
_libpq.PQfreeCancel.argtypes = [ctypes.c_void_p]


def send_cancel(connection: Any, then: Callable[[], None] | None = None) -> threading.Event:
    """Ask the server (or the pooler, which forwards it) to cancel what `connection` is running.

    The request travels on a new connection to the same host, so it can take as long as
    connecting does, or longer on a silent network: it runs in a daemon thread, and the
    returned event is set (and `then` called, from that thread) once the server has taken the
    request, or it failed. The caller waits on it as long as it can afford. The cancel key is
    copied out of the connection first, so the connection may be closed meanwhile.
    """
    done = threading.Event()
    cancel = _libpq.PQgetCancel(connection.pgconn_ptr)
    if not cancel:
        done.set()
        if then is not None:
            then()
        return done

    def run() -> None:
        errors = ctypes.create_string_buffer(256)
        try:
            if not _libpq.PQcancel(cancel, errors, len(errors)):
                log.warning("db.cancel_failed", error=errors.value.decode(errors="replace"))
        finally:
            _libpq.PQfreeCancel(cancel)
            done.set()
            if then is not None:
                then()

    threading.Thread(target=run, name="db-cancel", daemon=True).start()
    return done
