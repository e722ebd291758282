"""Where prometheus-client's worker processes keep their numbers, so that one scrape, whichever
worker answers it, reports every worker's requests together.

prometheus-client counts in memory, per process. With `uvicorn --workers N` each worker would
report only its own share, a different one at each scrape. Its multiprocess mode has each
process write its numbers to files in PROMETHEUS_MULTIPROC_DIR and a scrape read them all; it
needs the variable set before prometheus_client is first imported, an empty directory at
start, and the live gauges of a worker that died removed (`mark_process_dead`).

So an operator need not know any of that, the directory is chosen here (`metrics_directory`):
- PROMETHEUS_MULTIPROC_DIR set: that directory, as given (the operator empties it at start;
  this is the way for gunicorn and other process managers that fork their workers).
- Unset, in a process that a Python supervisor started (`uvicorn --workers N`, `--reload`): a
  directory of our own in the temporary directory, named for the supervisor (its pid and the
  time it started), shared by its workers and new with every start of the service. Directories
  of supervisors that are no longer running are removed.
- Unset, in a process of its own (plain `uvicorn`): none; prometheus-client counts in memory.
"""

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from backend.platform.processes import process_is_running

log = structlog.get_logger("backend.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OWN_DIRECTORY_PREFIX = "todo-api-metrics-"


def metrics_directory() -> Path | None:
    """The directory this process's metrics go to, or None for in-memory ones. Sets
    PROMETHEUS_MULTIPROC_DIR when it chooses one; call before importing prometheus_client."""
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if multiprocessing.parent_process() is None:
        return None
    path = _supervisor_directory(os.getppid())
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def check_prometheus_client_mode(directory: Path | None) -> None:
    """Refuse to run with numbers that a scrape would not see: prometheus_client decides at its
    first import whether it writes to files, so an import before `metrics_directory()` (by
    another library) would leave this worker counting in memory only."""
    from prometheus_client import values  # noqa: PLC0415 - after the directory is chosen

    writes_files = bool(getattr(values.ValueClass, "_multiprocess", False))
    if writes_files != (directory is not None):
        raise RuntimeError(
            "prometheus_client was imported before the metrics directory was chosen; set "
            f"{MULTIPROC_ENV} to an empty directory in the service's environment"
        )


def forget_dead_workers(directory: Path) -> None:
    """Drop the gauges of workers that are no longer running (their counters stay: what they
    counted happened). Cheap: a directory listing and a signal 0 per gauge file."""
    from prometheus_client import multiprocess  # noqa: PLC0415

    for file in directory.glob("gauge_live*_*.db"):
        pid = _pid_of(file.stem)
        if pid is not None and not process_is_running(pid):
            multiprocess.mark_process_dead(pid, str(directory))


def forget_this_worker(directory: Path) -> None:
    """At a clean exit: this worker's gauges go; its counters stay for the others to report."""
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(os.getpid(), str(directory))


def _pid_of(stem: str) -> int | None:
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _started_at(pid: int) -> str:
    """When the process started, in clock ticks since boot (Linux), so that a new supervisor
    that happens to get an old one's pid does not inherit its numbers; empty elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _supervisor_directory(supervisor: int) -> Path:
    base = Path(tempfile.gettempdir())
    _remove_directories_of_stopped_supervisors(base)
    path = base / f"{OWN_DIRECTORY_PREFIX}{supervisor}-{_started_at(supervisor)}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass  # another worker of the same supervisor made it
    # The temporary directory is shared with other users: a directory planted there under our
    # name must not receive (or feed) our numbers.
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(
            f"{path} is not a private directory of this user; set {MULTIPROC_ENV} to an empty "
            "directory for the metrics of the service's workers"
        )
    return path


def _remove_directories_of_stopped_supervisors(base: Path) -> None:
    for path in base.glob(f"{OWN_DIRECTORY_PREFIX}*"):
        pid = path.name.removeprefix(OWN_DIRECTORY_PREFIX).split("-", 1)[0]
        try:
            owned = path.lstat().st_uid == os.getuid() and not path.is_symlink()
        except OSError:
            continue
        if owned and pid.isdigit() and not process_is_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            log.info("metrics.stale_directory_removed", directory=str(path))
