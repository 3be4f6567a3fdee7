"""pipeline.storage: files in a folder or a bucket, written atomically, read tolerantly.

The bucket branch runs on fsspec's in-memory filesystem behind ``pyarrow.fs.PyFileSystem`` (the
``bucket`` fixture of ``tests/conftest.py``): a filesystem that is not the local one, reached
through a URI, as ``s3://`` or ``gs://`` would be.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.fs
import pytest

from pipeline import storage


def _names(fs: pyarrow.fs.FileSystem, folder: str) -> list[str]:
    return sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(folder)))


def test_resolve_makes_folders_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("checkpoints") == str(tmp_path.resolve() / "checkpoints")
    assert storage.resolve("s3://bucket/runs/") == "s3://bucket/runs"


def test_local_round_trip_and_missing_files(tmp_path):
    path = str(tmp_path / "deep" / "er" / "state.json")
    assert storage.read_bytes(path) is None and storage.read_text(path) is None
    assert storage.read_json(path) == {} and not storage.exists(path)
    storage.write_json(path, {"b": 1, "a": [1, 2]})
    assert storage.read_json(path) == {"a": [1, 2], "b": 1} and storage.exists(path)
    assert Path(path).read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'  # sorted
    assert storage.read_bytes(str(tmp_path / "deep")) is None  # a folder is no file
    storage.delete_dir(str(tmp_path / "deep"))
    assert not (tmp_path / "deep").exists()
    storage.delete_dir(str(tmp_path / "deep"))  # nothing there: nothing happens


def test_write_leaves_no_temporary_file(tmp_path):
    for i in range(3):
        storage.write_bytes(str(tmp_path / "f.bin"), bytes([i]) * 10)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == bytes([2]) * 10


class _HalfStream:
    """An output stream that writes half of what it gets, then fails (a full disk)."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()

    def write(self, data):
        self.stream.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")


class _FullDisk:
    """The local filesystem, whose output streams fail half-way."""

    def __init__(self):
        self.fs = pyarrow.fs.LocalFileSystem()

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path):
        return _HalfStream(self.fs.open_output_stream(path))


def test_a_write_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    storage.write_json(str(path), {"old": True})
    monkeypatch.setattr(storage, "fs_of", lambda uri: (_FullDisk(), str(Path(uri).resolve())))
    with pytest.raises(OSError, match="No space left"):   # a file of a folder or a bucket
        storage.write_bytes(str(path), json.dumps({"new": True, "padding": "x" * 1000}).encode())
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the partial one removed


def test_a_reader_never_sees_a_partial_file(tmp_path):
    """A reader polling while a writer replaces a 1 MiB file again and again sees nothing or a
    whole version, never a mix or a prefix."""
    path = str(tmp_path / "big.bin")
    versions = [bytes([i]) * (1 << 20) for i in range(2)]
    storage.write_bytes(path, versions[0])
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = storage.read_bytes(path)
            seen.append(data in versions)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            storage.write_bytes(path, versions[i % 2])
    finally:
        stop.set()
        reader.join(timeout=30)
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} reads saw a partial file"


@pytest.mark.parametrize("text, why", [('{"mlflow_run_id": "12', "not valid JSON"),
                                       ("", "not valid JSON"),
                                       ('["a list"]', "not a JSON object"),
                                       ("\xff\xfe garbage", "not valid JSON")])
def test_read_json_treats_a_torn_or_foreign_file_as_absent(tmp_path, capsys, text, why):
    path = tmp_path / "state.json"
    path.write_text(text, encoding="latin-1")
    assert storage.read_json(str(path)) == {}
    assert f"storage: ignoring {path}: {why}" in capsys.readouterr().err


def test_a_bucket_round_trip(bucket):
    uri = "mem://bucket/sweeps/anchor_sweep"
    assert not storage.exists(uri) and storage.read_json(f"{uri}/state.json") == {}
    storage.write_json(f"{uri}/state.json", {"inputs_key": "k"})
    storage.write_json(f"{uri}/trials/t1.json", {"finished": True})
    assert storage.read_json(f"{uri}/state.json") == {"inputs_key": "k"}
    assert json.loads(storage.read_text(f"{uri}/trials/t1.json")) == {"finished": True}
    assert storage.exists(uri) and storage.exists(f"{uri}/trials/t1.json")
    # written atomically there too: no temporary object left beside the targets
    assert _names(bucket, "bucket/sweeps/anchor_sweep") == ["state.json", "trials"]
    assert _names(bucket, "bucket/sweeps/anchor_sweep/trials") == ["t1.json"]
    storage.write_bytes(f"{uri}/state.json", b"[1, 2]")  # a torn / foreign object
    assert storage.read_json(f"{uri}/state.json") == {}
    storage.delete_dir(uri)
    assert not storage.exists(uri) and storage.exists("mem://bucket/sweeps")


def test_the_run_state_of_a_training_stage_lives_in_a_bucket_too(bucket):
    from pipeline.training import resume

    root = "mem://bucket/checkpoints"
    resume.write_run_state(root, "train_rpn-abc", "0123")
    assert resume.read_run_state(root, "train_rpn-abc") == {"mlflow_run_id": "0123"}
    assert resume.latest_checkpoint(root, "train_rpn-abc") is None  # no snapshot yet


def test_a_file_staged_in_a_bucket_is_downloaded_once_per_node(bucket, tmp_path, monkeypatch):
    """stage_file puts a local file under root/staged/<digest>/ (once: a second call uploads
    nothing); local_copy gives each node a copy in its private cache (0700), downloaded once,
    whole, and used only while its content matches the digest: a copy changed in the cache
    is downloaded again; a download that does not match is refused."""
    import pyarrow.fs as pafs

    from pipeline.digests import file_digest
    from pipeline.errors import DataError

    data = bytes(range(256)) * 4000
    (tmp_path / "train.parquet").write_bytes(data)
    digest = file_digest(tmp_path / "train.parquet")
    uri = storage.stage_file(tmp_path / "train.parquet", "mem://b/ckpt", digest)
    assert uri == f"mem://b/ckpt/staged/{digest}/train.parquet"
    copies = []
    original = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda *a, **kw: copies.append(a) or original(*a, **kw))
    assert storage.stage_file(tmp_path / "train.parquet", "mem://b/ckpt", digest) == uri
    assert copies == []                                         # already there: not again
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "node_cache"))
    local = storage.local_copy(uri, digest)
    assert local == tmp_path / "node_cache" / digest / "train.parquet"
    assert local.read_bytes() == data and len(copies) == 1
    assert (tmp_path / "node_cache").stat().st_mode & 0o777 == 0o700
    assert storage.local_copy(uri, digest) == local and len(copies) == 1   # no second download
    assert not [p for p in local.parent.iterdir() if p.name.endswith(".tmp")]
    local.write_bytes(b"planted")                        # changed in the cache: not used
    assert storage.local_copy(uri, digest).read_bytes() == data and len(copies) == 2
    with pytest.raises(DataError, match="does not match the digest"):
        storage.local_copy(uri, "0" * 64)
    assert not (tmp_path / "node_cache" / ("0" * 64) / "train.parquet").exists()
    assert storage.local_copy(str(tmp_path / "train.parquet"), digest) == \
        tmp_path / "train.parquet"
