"""Where raysft reads and writes: local paths or object-store URIs (s3://, gs://), through pyarrow.fs.

`resolve(uri)` turns a path or URI into (pyarrow FileSystem, path inside it). Credentials are never
read or stored by raysft: pyarrow's S3 and GCS clients find them in the standard places (AWS_*
variables, ~/.aws files, instance roles; GOOGLE_APPLICATION_CREDENTIALS), and a pickled filesystem
carries no secret unless one was passed explicitly (raysft never does). The endpoint of an
S3-compatible store comes from `storage.endpoint_url` or the standard `AWS_ENDPOINT_URL`.

Failures a user can cause (an unreachable endpoint, a missing bucket, no credentials, a missing
object) become one `StorageError` sentence naming the URI.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs

from raysft.pipeline.atomic import write_atomic
from raysft.pipeline.errors import DataError

CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


class StorageError(DataError):
    """An object store or file that cannot be reached, found or read (one sentence naming the URI)."""


@dataclass(frozen=True)
class StorageOptions:
    """How object-store URIs are reached (the `storage` config section; all optional)."""

    endpoint_url: str | None = None
    region: str | None = None
    require_credentials: bool = True

    @classmethod
    def of(cls, cfg: Any) -> StorageOptions:
        """From a Config (its `storage` section, when it has one), a dict, or None."""
        section = getattr(cfg, "storage", cfg)
        if section is None:
            return cls()
        if isinstance(section, dict):
            return cls(**{k: section[k] for k in ("endpoint_url", "region", "require_credentials") if k in section})
        return cls(
            getattr(section, "endpoint_url", None),
            getattr(section, "region", None),
            getattr(section, "require_credentials", True),
        )


def scheme(uri: str | os.PathLike) -> str:
    """'s3', 'gs', ... for a URI; '' for a local path (file:// counts as local)."""
    text = str(uri)
    if "://" not in text:
        return ""
    s = text.split("://", 1)[0].lower()
    return "" if s == "file" else s


def is_remote(uri: str | os.PathLike | None) -> bool:
    return uri is not None and scheme(uri) != ""


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or a URI (URIs always use '/')."""
    text = str(base)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text).joinpath(*parts))


def local_path(uri: str | os.PathLike) -> str:
    """An absolute local path for a local path or file:// URI."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return str(Path(os.path.expanduser(text)).resolve())


def _endpoint(options: StorageOptions) -> tuple[str | None, str | None]:
    """(endpoint host[:port] or URL, scheme) from the config key or AWS_ENDPOINT_URL(_S3)."""
    url = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, None
    if "://" in url:
        proto, rest = url.split("://", 1)
        return rest.rstrip("/"), proto
    return url, "https"


def has_aws_credentials() -> bool:
    """Whether the standard AWS chain has a source raysft can see (variables or shared files)."""
    if any(os.environ.get(v) for v in CREDENTIAL_VARS):
        return True
    files = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    ]
    return any(Path(os.path.expanduser(f)).is_file() for f in files)


def filesystem(uri: str | os.PathLike, options: StorageOptions | None = None) -> pafs.FileSystem:
    """The pyarrow FileSystem for `uri` (local, s3://, gs://; other schemes through fsspec)."""
    options = options or StorageOptions()
    s = scheme(uri)
    if s == "":
        return pafs.LocalFileSystem()
    if s == "s3":
        if options.require_credentials and not has_aws_credentials():
            raise StorageError(
                f"No credentials for {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                f"storage.require_credentials=false for an anonymous bucket or an instance role."
            )
        endpoint, proto = _endpoint(options)
        region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        kwargs: dict[str, Any] = dict(
            region=region,
            connect_timeout=5,
            request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        if endpoint:
            kwargs.update(endpoint_override=endpoint, scheme=proto)
        return pafs.S3FileSystem(**kwargs)
    if s in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(s)))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"The storage URI {uri} has an unsupported scheme {s}:// ({exc}).") from None


def resolve(uri: str | os.PathLike, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; relative local paths become absolute."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    return filesystem(uri, options), str(uri).split("://", 1)[1].rstrip("/")


def describe(exc: BaseException) -> str:
    """The useful part of a pyarrow/AWS error, short."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for marker in ("AWS Error ", "Could not connect", "curlCode"):
        if marker in text:
            text = text[text.index(marker) :]
            break
    return text[:200]


def failure(uri: str, exc: BaseException, what: str = "read") -> StorageError:
    """One sentence for a storage call that failed."""
    text = describe(exc)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text:
        return StorageError(
            f"Cannot reach the object store for {uri} ({text}); check storage.endpoint_url / "
            f"AWS_ENDPOINT_URL and the network."
        )
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return StorageError(f"The bucket of {uri} does not exist.")
    if (
        "ACCESS_DENIED" in text
        or "AccessDenied" in text
        or "InvalidAccessKeyId" in text
        or "SignatureDoesNotMatch" in text
    ):
        return StorageError(f"Access to {uri} was denied ({text}); check the credentials.")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri} does not exist.")
    return StorageError(f"Could not {what} {uri} ({text}).")


def check_location(uri: str, options: StorageOptions | None = None, *, must_exist: bool = False) -> None:
    """Fail in one sentence, before any work starts, when `uri`'s store or bucket cannot be used."""
    if not is_remote(uri):
        return
    fs, path = resolve(uri, options)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"The bucket of {uri} does not exist.")
        if must_exist and fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri} does not exist.")
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        raise failure(uri, exc) from None


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, ValueError) as exc:
        raise failure(uri, exc) from None


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object/file (an object-store PUT is atomic; a local file goes through a temp sibling)."""
    fs, path = resolve(uri, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            write_atomic(path, data)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)
    except (OSError, ValueError) as exc:
        raise failure(uri, exc, "write") from None


def append_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Append to a local file; an object is rewritten with `data` added (for small, rarely written files only)."""
    if not is_remote(uri):
        path = Path(local_path(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(data)
        return
    old = read_bytes(uri, options) if exists(uri, options) else b""
    write_bytes(uri, old + data, options)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, ValueError) as exc:
        raise failure(uri, exc) from None


def list_files(uri: str, suffix: str = "", options: StorageOptions | None = None) -> list[tuple[str, int]]:
    """(URI or path, size) of every file under `uri` ending with `suffix`, sorted; [] when it does not exist."""
    fs, path = resolve(uri, options)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as exc:
        raise failure(uri, exc, "list") from None
    prefix = f"{scheme(uri)}://" if is_remote(uri) else ""
    return sorted((prefix + i.path, i.size) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


class Uri(str):
    """An object-store file named by its URI, with the few Path-like members the input readers use."""

    size: int = -1
    mtime_ns: int = 0
    options: StorageOptions | None = None

    @property
    def name(self) -> str:
        return posixpath.basename(str(self))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def resolve(self) -> Uri:
        return self

    def is_file(self) -> bool:
        return True

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self.size, st_mtime_ns=self.mtime_ns)

    def read_bytes(self) -> bytes:
        return read_bytes(str(self), self.options)


def remote_files(spec: str, suffixes: tuple[str, ...], options: StorageOptions | None = None) -> list[Uri]:
    """The files a remote spec names: one object, or every object with one of `suffixes` under a prefix."""
    fs, path = resolve(spec, options)
    check_location(spec, options)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.Directory:
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and posixpath.splitext(i.path)[1].lower() in suffixes
            ]
        else:
            raise StorageError(f"The data path {spec} does not exist.")
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        raise failure(spec, exc) from None
    out = []
    for i in sorted(infos, key=lambda i: i.path):
        uri = Uri(f"{scheme(spec)}://{i.path}")
        uri.size = int(i.size or 0)
        uri.mtime_ns = int(i.mtime_ns or 0)
        uri.options = options
        out.append(uri)
    return out


def open_input(path: str | os.PathLike, options: StorageOptions | dict | None = None):
    """A seekable binary file for a local path or a URI."""
    if not is_remote(path):
        return open(os.fspath(path), "rb")
    opts = StorageOptions.of(options) if isinstance(options, dict) else (options or getattr(path, "options", None))
    fs, inner = resolve(str(path), opts)
    try:
        return io.BufferedReader(fs.open_input_file(inner), buffer_size=1 << 20)  # readline(), buffered reads
    except (OSError, ValueError) as exc:
        raise failure(str(path), exc) from None


def download(uri: str, local: str | os.PathLike, options: StorageOptions | None = None) -> bool:
    """Copy a remote file or folder to a local path; False when `uri` does not exist."""
    fs, path = resolve(uri, options)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if info.type == pafs.FileType.Directory:
            Path(local).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except (OSError, ValueError) as exc:
        raise failure(uri, exc) from None
    return True


def copy_tree(src: str, dst: str, options: StorageOptions | None = None) -> None:
    """Copy a file or folder between any two places (local paths or URIs), store to store without a local copy."""
    sfs, spath = resolve(src, options)
    dfs, dpath = resolve(dst, options)
    try:
        if isinstance(dfs, pafs.LocalFileSystem):
            Path(dpath).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)
    except (OSError, ValueError) as exc:
        raise failure(dst, exc, "write") from None


def remove_tree(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or folder (local or remote); nothing when it does not exist."""
    fs, path = resolve(uri, options)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except (OSError, ValueError) as exc:
        raise failure(uri, exc, "write") from None


def upload(local: str | os.PathLike, uri: str, options: StorageOptions | None = None) -> None:
    """Copy a local file or folder to a remote path (objects are replaced, not merged with stale ones)."""
    fs, path = resolve(uri, options)
    try:
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except (OSError, ValueError) as exc:
        raise failure(uri, exc, "write") from None


def ray_storage(uri: str, options: StorageOptions | None = None) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: the bucket path and its filesystem for a
    URI (the filesystem pickles without credentials: each process finds its own), (path, None) for a folder."""
    if not is_remote(uri):
        return local_path(uri), None
    fs, path = resolve(uri, options)
    return path, fs
