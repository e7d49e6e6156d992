"""One writer per run folder: a lease naming its holder (host, pid, since), renewed while the holder lives.

`hold(folder)` is taken by the one process that writes a run folder (a `raysft train` or tune driver, a
tune trial) or a `prepare --output` folder, for as long as it writes. A second taker is refused in one
sentence naming the holder. A lease whose holder is gone is taken over: on the holder's own machine
(same host name and PID namespace) when its pid no longer runs the process that took the lease; from
anywhere else when it has not been renewed for its `ttl_s` (a thread renews it every ttl_s / 4).

Where the lease lives: `FOLDER/.raysft-lease.json` for a run folder (`in_folder`); beside the folder,
`PARENT/.NAME.raysft-lease.json`, for an output folder that is swapped in whole when it is done (`beside`).
How it is taken atomically:
- a local (or NFS) path: created by a hard link (which fails when it exists); renewed, taken over and
  deleted under a short file lock in ~/.cache/raysft/locks (a check and its write are one step on this
  machine; across machines only a taker of an expired lease could race);
- s3://: the object, created with a conditional write (`If-None-Match: *`),
  renewed, taken over and deleted only if its ETag is still the one read (`If-Match`); the lease's age
  is the store's own clock (response `Date` minus `Last-Modified`), so clocks of machines do not matter;
- other object stores (gs://): written through pyarrow and read back after a moment to see who won; a
  race inside that moment is possible (no conditional writes without the store's own client).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

from raysft.pipeline import storage
from raysft.pipeline.errors import CheckpointError, RunInUseError
from raysft.pipeline.storage import StorageOptions

LEASE_FILE = ".raysft-lease.json"
TTL_S = 60.0  # a holder elsewhere that has not renewed for this long is taken to be dead


def machine() -> str:
    """This process's machine as far as pids go: host name and PID namespace (containers share a host name)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}:{namespace}"


def process_start(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), or None when no such process runs."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class Holder:
    """Who holds a lease: what the refusal names and what decides whether it still lives."""

    host: str
    pid: int
    since: float  # when the lease was taken (epoch seconds)
    machine: str  # host name and PID namespace, see machine()
    pid_start: float  # the holder process's start time: a pid reused by another process is not the holder
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    ttl_s: float = TTL_S
    renewed: float = 0.0

    @classmethod
    def me(cls, ttl_s: float = TTL_S) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, machine(), process_start(os.getpid()) or 0.0, ttl_s=ttl_s,
                   renewed=now)  # fmt: skip

    def alive(self, age_s: float) -> bool:
        """On this machine: its process still runs. Elsewhere: it renewed the lease within ttl_s."""
        if self.machine == machine():
            start = process_start(self.pid)
            return start is not None and abs(start - self.pid_start) < 1.0
        return age_s < self.ttl_s

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"raysft on host {self.host} (pid {self.pid}, since {since})"

    def dumps(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (ValueError, TypeError, KeyError):
            return None  # an unreadable lease protects nothing: it is taken over like a dead holder's


# A lease as read: (holder or None when unreadable, its age in seconds, the version a swap must match).
Read = tuple["Holder | None", float, str]


class LocalStore:
    """A lease file on a local (or NFS) path. Created with a hard link (fails if it exists, atomically, also on
    NFS); renewed, taken over and deleted under a short file lock of this machine's (~/.cache/raysft/locks), so
    nothing but the lease itself is left in the user's folders."""

    def __init__(self, path: Path) -> None:
        self.path = path
        key = hashlib.sha256(str(path).encode()).hexdigest()[:24]
        self.lock = Path(os.path.expanduser(os.path.join("~", ".cache", "raysft", "locks", f"lease-{key}.lock")))
        self.made_folder = not path.parent.exists()  # removed again with the lease when nothing else was written
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> Read | None:
        try:
            data, mtime = self.path.read_bytes(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        holder = Holder.loads(data)
        return holder, time.time() - mtime, holder.token if holder else "unreadable"

    def _write(self, new: Holder, replace: bool) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(new.dumps())
        try:
            if replace:
                os.replace(tmp, self.path)
                return True
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def swap(self, expected: str | None, new: Holder) -> str | None:
        """Write `new` if the lease is still at version `expected` (None: no lease); its version, else None."""
        from filelock import FileLock

        if expected is None:
            return new.token if self._write(new, replace=False) else None
        with FileLock(self.lock):
            current = self.read()
            if current is None or current[2] != expected:
                return None
            self._write(new, replace=True)
            return new.token

    def delete(self, expected: str) -> None:
        from filelock import FileLock

        with FileLock(self.lock):
            current = self.read()
            if current and current[2] == expected:
                self.path.unlink()
                if self.made_folder:
                    with contextlib.suppress(OSError):  # not empty: the run wrote into it
                        self.path.parent.rmdir()


class S3Store:
    """A lease object on s3://, through boto3's conditional writes (If-None-Match, If-Match)."""

    def __init__(self, uri: str, options: StorageOptions) -> None:
        import boto3

        self.uri = uri
        self.bucket, _, self.key = uri.split("://", 1)[1].partition("/")
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint
        region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=region)

    def _failed(self, exc: Exception) -> bool:
        """True for a failed condition (someone else changed the lease); other errors are the store's."""
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"):
            return True
        raise storage.failure(self.uri, exc, "write") from None

    def read(self) -> Read | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise storage.failure(self.uri, exc) from None
        server_now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - got["LastModified"]).total_seconds()
        return Holder.loads(got["Body"].read()), age, got["ETag"]

    def swap(self, expected: str | None, new: Holder) -> str | None:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=new.dumps(), **condition)["ETag"]
        except Exception as exc:
            self._failed(exc)
            return None

    def delete(self, expected: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except Exception as exc:
            self._failed(exc)


class PlainStore:
    """Another object store through pyarrow: no conditional writes, so a swap writes and reads back to see
    who won (the last writer within `settle_s` wins; both would see that)."""

    def __init__(self, uri: str, options: StorageOptions, settle_s: float = 1.0) -> None:
        self.uri, self.options, self.settle_s = uri, options, settle_s

    def read(self) -> Read | None:
        fs, path = storage.resolve(self.uri, self.options)
        info = fs.get_file_info(path)
        if info.size is None:
            return None
        holder = Holder.loads(storage.read_bytes(self.uri, self.options))
        age = time.time() - (info.mtime.timestamp() if info.mtime else 0.0)
        return holder, age, holder.token if holder else "unreadable"

    def swap(self, expected: str | None, new: Holder) -> str | None:
        current = self.read()
        if (current[2] if current else None) != expected:
            return None
        storage.write_bytes(self.uri, new.dumps(), self.options)
        time.sleep(self.settle_s)
        after = self.read()
        return new.token if after and after[2] == new.token else None

    def delete(self, expected: str) -> None:
        current = self.read()
        if current and current[2] == expected:
            fs, path = storage.resolve(self.uri, self.options)
            with contextlib.suppress(OSError):
                fs.delete_file(path)


def in_folder(folder: str | os.PathLike) -> str:
    """The lease of a run folder: a file inside it."""
    return storage.join(folder, LEASE_FILE)


def beside(folder: str | os.PathLike) -> str:
    """The lease of an output folder that is swapped in whole: a file next to it."""
    text = str(folder).rstrip("/")
    if storage.is_remote(text):
        return f"{text}{LEASE_FILE}"
    path = Path(storage.local_path(text))
    return str(path.with_name(f".{path.name}{LEASE_FILE}"))


def store_for(lease: str | os.PathLike, options: StorageOptions | None = None):
    """The store of a lease file or object (local, s3://, other object stores)."""
    options = options or StorageOptions()
    if not storage.is_remote(lease):
        return LocalStore(Path(storage.local_path(lease)))
    if storage.scheme(lease) == "s3":
        return S3Store(str(lease), options)
    return PlainStore(str(lease), options)


class Lease:
    """A lease this process holds; a daemon thread renews it until `release()`."""

    def __init__(self, store, holder: Holder, version: str) -> None:
        self.store, self.holder, self.version = store, holder, version
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="raysft-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.holder.ttl_s / 4):
            self.holder.renewed = time.time()
            try:
                version = self.store.swap(self.version, self.holder)
            except Exception:  # the store is unreachable for now: try again at the next tick
                continue
            if version is None:
                self.lost = True
                print(
                    "raysft: warning: this process's lease on its folder was taken over by another process "
                    "(it did not renew it in time); two writers may now share the folder.",
                    file=sys.stderr,
                    flush=True,
                )
                return
            self.version = version

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost:
            with contextlib.suppress(Exception):  # a lease not deleted is taken over once its holder is gone
                self.store.delete(self.version)


def acquire(
    lease: str | os.PathLike,
    what: str,
    options: StorageOptions | None = None,
    ttl_s: float = TTL_S,
    wait_elsewhere: bool = False,
) -> Lease:
    """Take the lease at `lease` (`in_folder(run_dir)`, `beside(output)`) or refuse in one sentence naming its holder.

    `what` names the folder in the sentence ("The run folder /runs/x"). A lease whose holder is gone is taken
    over, with a one-line notice. With `wait_elsewhere`, a holder on another machine is waited for until its
    lease expires (a resumed tune trial whose previous process died with its node) instead of refused.
    """
    try:
        return _acquire(store_for(lease, options), what, ttl_s, wait_elsewhere)
    except OSError as exc:  # a local folder: the store's own errors are StorageErrors already
        raise CheckpointError(f"{what} cannot hold raysft's lease file {lease} ({exc.strerror or exc}).") from None


def _acquire(store, what: str, ttl_s: float, wait_elsewhere: bool) -> Lease:
    mine = Holder.me(ttl_s)
    races, waited_age = 0, None
    while races < 5:  # each pass either takes the lease or sees another process take it first
        current = store.read()
        if current is None:
            version = store.swap(None, mine)
        else:
            holder, age, expected = current
            if holder is not None and holder.alive(age):
                renewed = waited_age is not None and age < waited_age  # younger than when we last looked
                if wait_elsewhere and holder.machine != machine() and not renewed:
                    waited_age = age
                    time.sleep(min(5.0, holder.ttl_s / 8))  # until it expires, unless its holder renews it
                    continue
                raise RunInUseError(
                    f"{what} is in use by {holder.describe()}; wait for it to finish or stop it, then run this again."
                )
            version = store.swap(expected, mine)
            if version is not None:
                gone = holder.describe() if holder else "an unreadable lease"
                print(f"raysft: taking over {what} from {gone}, which is no longer running.", file=sys.stderr)
        if version is not None:
            return Lease(store, mine, version)
        races += 1
    raise RunInUseError(f"{what} is being taken by several processes at once; run this again in a moment.")


@contextlib.contextmanager
def hold(
    lease: str | os.PathLike, what: str, options: StorageOptions | None = None, wait_elsewhere: bool = False
) -> Iterator[Lease]:
    """`acquire` for the length of a `with` block; released however the block ends."""
    held = acquire(lease, what, options, wait_elsewhere=wait_elsewhere)
    try:
        yield held
    finally:
        held.release()


def live_holder(lease: str | os.PathLike, options: StorageOptions | None = None) -> Holder | None:
    """Who holds the lease at `lease` now, if anyone alive does (read only: nothing is created)."""
    if not storage.is_remote(lease) and not Path(storage.local_path(lease)).exists():
        return None
    current = store_for(lease, options).read()
    if current is None or current[0] is None:
        return None
    holder, age, _ = current
    return holder if holder.alive(age) else None
