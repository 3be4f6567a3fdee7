"""pipeline.digests: the digests that decide whether a run or a sweep can be resumed."""

from __future__ import annotations

import hashlib

from pipeline.digests import digest, file_digest, params_subset


def test_file_digest_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # more than one 1 MiB chunk
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()


def test_digest_ignores_key_order_and_has_the_asked_length():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert len(digest({"a": 1})) == 16 and len(digest({"a": 1}, length=12)) == 12


def test_params_subset_keeps_sections_and_drops_excluded_keys():
    tree = {"train": {"lr": 0.1, "storage_path": "x"}, "rpn": {"pos_iou": 0.7},
            "tracking": {"uri": "sqlite:///m.db"}}
    assert params_subset(tree, sections=("train", "rpn"), exclude=("train.storage_path",)) == {
        "train": {"lr": 0.1}, "rpn": {"pos_iou": 0.7}}
