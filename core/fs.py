"""Local paths and URIs (s3://, gs://, abfs://, hdfs://, file://) through pyarrow's filesystems.

`storage` and `data.prepared` may live in an object store: Ray Train writes checkpoints there through the same
pyarrow filesystem, Ray Data reads and writes Parquet through it, and zeray's own small files (config, metrics,
reports) go through these helpers. Credentials and endpoints come from the environment the way pyarrow reads them
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_REGION/AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...), never
from the URI, which is saved with the run.
"""

import os
import posixpath
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs as pafs

from core.errors import UserError, first_line

SCHEMES = {"s3": "s3", "gcs": "gs", "abfs": "abfs", "hdfs": "hdfs"}  # pyarrow's type_name -> URI scheme


def is_uri(location: str) -> bool:
    return "://" in location


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a local path or a URI."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return os.path.join(location, *parts)


def check_uri(location: str) -> str | None:
    """Why a URI cannot be a zeray location (None when it can): credentials or options belong in the environment."""
    parts = urlsplit(location)
    if parts.username is not None or parts.password is not None:
        return (
            "credentials do not belong in the config (it is saved with the run): give them through the "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)"
        )
    if parts.query or parts.fragment:
        return (
            "options do not go in the URI (run folders are named by appending to it): set the endpoint and "
            "region through the environment (AWS_ENDPOINT_URL, AWS_REGION)"
        )
    return None


def resolve(location: str, key: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for `location` (a local path or a URI) and the path inside it; `key` names the config
    key or argument it came from in the one-line error when pyarrow cannot open it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    if problem := check_uri(location):
        raise UserError(f"{key}: {problem}")
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        first = first_line(exc)
        raise UserError(
            f"{key}: {location}: pyarrow cannot open it ({first}); use a local path or an "
            "s3://, gs://, abfs:// or hdfs:// URI"
        ) from None
    return fs, path.rstrip("/")


def reach(location: str, key: str) -> tuple[pafs.FileSystem, str]:
    """`resolve`, and one request to the store (pyarrow connects lazily): an unreachable endpoint or refused
    credentials become one line naming `key` here, not a traceback later."""
    fs, path = resolve(location, key)
    try:
        fs.get_file_info(path)
    except OSError as exc:
        first = first_line(exc)
        raise UserError(
            f"{key}: {location}: cannot reach it ({first}); check the endpoint and credentials in the "
            "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, ...)"
        ) from None
    return fs, path


def display(fs: pafs.FileSystem, path: str) -> str:
    """The path as a user names it: a URI for an object store, the plain path on this machine."""
    scheme = SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return kind(fs, path) != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file: renamed into place on a local disk, one PUT on an object store (whole or absent)."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def files(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    """Every file under `path` (recursively) by its path relative to it, with its size; {} when there is none."""
    if kind(fs, path) != pafs.FileType.Directory:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {posixpath.relpath(i.path, path): i.size for i in infos if i.type == pafs.FileType.File}


def entries(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """What is directly inside `path`; [] when it does not exist."""
    if kind(fs, path) != pafs.FileType.Directory:
        return []
    return fs.get_file_info(pafs.FileSelector(path))


def upload(local: str, fs: pafs.FileSystem, path: str) -> None:
    """Copy a local file or folder to `path` in `fs`."""
    if os.path.isdir(local):
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    else:
        with open(local, "rb") as f:
            write_bytes(fs, path, f.read())


def download(fs: pafs.FileSystem, path: str, local: str) -> None:
    """Copy a file or folder at `path` in `fs` to the local `local`."""
    if kind(fs, path) == pafs.FileType.Directory:
        os.makedirs(local, exist_ok=True)
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        with open(local, "wb") as f:
            f.write(read_bytes(fs, path))
