"""Files in a local folder or a bucket (``s3://``, ``gs://``, ...) alike, through ``pyarrow.fs``.

Where Ray Train and Tune keep runs (``train.storage_path``, ``sweep.storage_path``) may be
either; the stages keep their own small files there (run state, trial markers, sweep state)
with these helpers. A local path is used absolute; a URI unchanged (for S3 the endpoint and
credentials come from the usual AWS environment variables, or from the URI itself).

Training input on a cluster travels the same way: :func:`stage_file` on the driver copies the
training table and the RPN model into the run's storage; Ray Data streams the table from there,
and :func:`local_copy` downloads the RPN model (one small file) once per node into a local
cache.

Writes are atomic: the bytes go to a temporary name beside the target, which is then moved
over it (a rename on a local disk; object stores replace a key whole anyway), so a reader never
sees half a file. Readers still tolerate a torn or foreign file (written by an older version, or
cut short by a full disk): :func:`read_json` treats it as absent and says so on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

#: Where nodes keep their copies of staged files (per user; $FRCNN_CACHE overrides).
CACHE_ENV = "FRCNN_CACHE"


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``s3://...``) rather than a local path."""
    return "://" in str(path)


def resolve(root: str) -> str:
    """A storage root as Ray wants it: an absolute folder, or a URI unchanged (no trailing /)."""
    return root.rstrip("/") if "://" in root else str(Path(root).resolve())


def fs_of(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path in it)`` of a folder path or URI."""
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else Path(uri).resolve().as_uri())


def exists(uri: str) -> bool:
    import pyarrow.fs
    fs, path = fs_of(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def is_empty(uri: str) -> bool:
    """Whether folder ``uri`` is missing or holds nothing."""
    import pyarrow.fs
    fs, path = fs_of(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return True
    return not fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))


def read_bytes(uri: str) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    import pyarrow.fs
    fs, path = fs_of(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str | None:
    """The file's text, or None when there is no such file."""
    data = read_bytes(uri)
    return None if data is None else data.decode("utf-8", errors="replace")


def read_json(uri: str) -> dict[str, Any]:
    """A JSON object file; ``{}`` when there is no such file, or when it is torn or not an
    object (said on stderr: what it held is lost, the caller starts without it)."""
    text = read_text(uri)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        print(f"storage: ignoring {uri}: not valid JSON ({exc})", file=sys.stderr, flush=True)
        return {}
    if not isinstance(value, dict):
        print(f"storage: ignoring {uri}: not a JSON object", file=sys.stderr, flush=True)
        return {}
    return value


def list_folder(uri: str) -> list[str] | None:
    """The URIs of the files directly in folder ``uri``, sorted by name; None when ``uri`` is
    not a folder."""
    import pyarrow.fs
    fs, path = fs_of(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return None
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    return sorted(f"{uri.rstrip('/')}/{i.base_name}" for i in infos
                  if i.type == pyarrow.fs.FileType.File)


def file_size(uri: str) -> int:
    """Bytes of a file, local or in a bucket."""
    fs, path = fs_of(uri)
    return fs.get_file_info(path).size


def upload_folder(local: Path, uri: str, *, last: str) -> None:
    """Put the files of the local folder ``local`` (and its subfolders) under folder ``uri``,
    replacing what had the same names there; ``last`` (a file name in ``local``) goes last and
    is deleted first, so a reader that requires it never sees a half-written folder."""
    import pyarrow.fs

    fs, root = fs_of(uri)
    local = Path(local)
    names = [p.relative_to(local).as_posix() for p in sorted(local.rglob("*"))]
    # what had these names goes first (``last`` before anything), folders of part files whole
    for name in sorted((n for n in names if "/" not in n), key=lambda n: n != last):
        info = fs.get_file_info(f"{root}/{name}")
        if info.type == pyarrow.fs.FileType.NotFound:
            continue
        if info.type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
    fs.create_dir(root, recursive=True)
    for name in sorted((n for n in names if (local / n).is_file()), key=lambda n: n == last):
        pyarrow.fs.copy_files(str(local / name), f"{root}/{name}",
                              source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically (temporary name, then a move over the target), making its folder."""
    fs, path = fs_of(uri)
    folder, _, name = path.rpartition("/")
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    finally:
        import pyarrow.fs
        if fs.get_file_info(tmp).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(tmp)


def write_json(uri: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys sorted), atomically: the project's one JSON writer,
    for local files (through :func:`pipeline.files.atomic_path`, flushed to disk) and bucket
    URIs alike."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if is_uri(uri):
        write_bytes(str(uri), text.encode("utf-8"))
        return
    from pipeline.files import atomic_path
    with atomic_path(uri) as tmp:
        tmp.write_text(text, encoding="utf-8")


def delete_dir(uri: str) -> None:
    """Delete a folder and what it holds; nothing when it is not there."""
    if exists(uri):
        fs, path = fs_of(uri)
        fs.delete_dir(path)


def stage_file(path: str | Path, root: str, digest: str, folder: str = "") -> str:
    """Copy the local file ``path`` to ``root/staged/<digest>/[<folder>/]<name>`` (``digest``:
    of its content, or of the table whose part it is, in ``folder``) unless it is there
    already; returns that URI (or folder path)."""
    import pyarrow.fs

    path = Path(path)
    uri = f"{root}/staged/{digest}/{folder + '/' if folder else ''}{path.name}"
    fs, target = fs_of(uri)
    info = fs.get_file_info(target)
    if info.type == pyarrow.fs.FileType.File and info.size == path.stat().st_size:
        return uri
    folder = target.rpartition("/")[0]
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pyarrow.fs.copy_files(str(path.resolve()), tmp,
                              source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        fs.move(tmp, target)
    finally:
        if fs.get_file_info(tmp).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(tmp)
    return uri


def cache_dir() -> Path:
    """This node's cache of staged files: ``$FRCNN_CACHE`` or ``<tmp>/frcnn-cache-<uid>``,
    private to this user (made 0700; one that others own or can write is refused).

    Raises:
        DataError: the folder is another user's, or others may write into it.
    """
    from pipeline.errors import DataError

    folder = Path(os.environ.get(CACHE_ENV) or
                  Path(tempfile.gettempdir()) / f"frcnn-cache-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise DataError(f"{folder}: the cache of staged files belongs to another user "
                        f"(uid {info.st_uid}); set ${CACHE_ENV} to a folder of your own")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)  # ours: made private (an older version made it 0755)
    return folder


def local_copy(uri: str | Path, digest: str) -> Path:
    """A file of the run's storage on this node's disk: a local path as it is; a URI
    downloaded once per node into :func:`cache_dir` (processes of the node wait for the one that
    downloads; the copy appears whole, by rename) and used only while its content has the
    SHA-256 ``digest`` it was staged under (:func:`pipeline.digests.file_digest`): a copy that
    differs, whoever put it there, is downloaded again.

    Raises:
        DataError: the download itself does not match ``digest``.
    """
    import pyarrow.fs

    from pipeline.digests import file_digest
    from pipeline.errors import DataError

    uri = str(uri)
    if "://" not in uri:
        return Path(uri)
    fs, path = fs_of(uri)
    target = cache_dir() / digest / path.rsplit("/", 1)[-1]
    if target.is_file() and file_digest(target) == digest:
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(target.parent / ".lock"):
        if not (target.is_file() and file_digest(target) == digest):
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                if file_digest(tmp) != digest:
                    from pipeline.redaction import redact
                    raise DataError(f"{redact(uri)}: its content does not match the digest it "
                                    f"was staged under ({digest[:12]}...); stage it again")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
