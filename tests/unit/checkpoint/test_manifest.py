"""Manifest checksums and damage detection, the atomic commit and `latest`, keep-last-N (no model).

Checkpoints here are folders of plain files committed with `layout.commit` in one process, the
same code path `save_checkpoint` ends with.
"""

import hashlib
import json
import os
import threading

import pytest

from miles.checkpoint.layout import (
    LATEST_NAME,
    commit,
    list_steps,
    prune,
    read_latest,
    resume_candidates,
    step_dir_name,
    tmp_dir,
    write_latest,
)
from miles.checkpoint.manifest import MANIFEST_NAME, read_manifest, sha256_text, verify

FILES = {"dist/__0_0.distcp": b"\x01" * 5000, "dist/.metadata": b"meta", "rng/rank_0.pt": b"rng" * 100,
         "rl_state.json": b'{"cursor": 3}\n', "config.yaml": b"run:\n  seed: 1\n"}


def fake_save(root, step, files=FILES, keep_last=None):
    """Write the files of a checkpoint into step_N.tmp/ and commit it; returns the folder."""
    tmp = tmp_dir(root, step)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data + str(step).encode())
    return commit(root, step, sha256_text(f"config {step}"), keep_last)


def test_manifest_records_size_and_sha256_of_every_file_and_is_written_last(tmp_path):
    ckpt = fake_save(tmp_path, 7)
    assert ckpt == tmp_path / "step_00000007" and not tmp_dir(tmp_path, 7).exists()
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    assert manifest["step"] == 7 and manifest["format_version"] == 1
    assert manifest["config_sha256"] == hashlib.sha256(b"config 7").hexdigest()
    assert set(manifest["files"]) == set(FILES)  # nested paths, hidden files; not the manifest itself
    for rel, data in FILES.items():
        assert manifest["files"][rel] == {"size": len(data) + 1, "sha256": hashlib.sha256(data + b"7").hexdigest()}
    # the manifest is the newest file of the folder
    newest = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MANIFEST_NAME
    assert verify(ckpt) == []
    assert read_latest(tmp_path) == "step_00000007"


def test_verify_names_truncated_corrupted_and_missing_files(tmp_path):
    ckpt = fake_save(tmp_path, 1)
    shard = ckpt / "dist" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(4096)
    assert verify(ckpt) == [f"truncated {shard}: expected 5001 bytes, got 4096"]

    shard.write_bytes(b"\x01" * 5000 + b"1")  # repaired
    assert verify(ckpt) == []
    rng_file = ckpt / "rng" / "rank_0.pt"
    data = bytearray(rng_file.read_bytes())
    data[10] ^= 0xFF  # same size, one bit pattern changed
    rng_file.write_bytes(bytes(data))
    expected = read_manifest(ckpt)["files"]["rng/rank_0.pt"]["sha256"]
    assert verify(ckpt) == [f"checksum mismatch in {rng_file}: expected sha256 {expected}, "
                            f"got {hashlib.sha256(bytes(data)).hexdigest()}"]

    (ckpt / "config.yaml").unlink()
    assert verify(ckpt)[0] == f"missing file {ckpt / 'config.yaml'}"
    (ckpt / "extra.txt").write_text("not listed")  # files outside the manifest are not its business
    assert len(verify(ckpt)) == 2

    (ckpt / MANIFEST_NAME).write_text('{"format_version": 1, "fil')
    assert verify(ckpt)[0].startswith(f"unreadable {ckpt / MANIFEST_NAME}")
    (ckpt / MANIFEST_NAME).unlink()
    assert verify(ckpt) == [f"missing {ckpt / MANIFEST_NAME} (the save did not finish)"]


def test_verify_shards_split_the_files_between_ranks(tmp_path):
    ckpt = fake_save(tmp_path, 1)
    for rel in FILES:
        with open(ckpt / rel, "ab") as f:
            f.write(b"!")
    per_rank = [verify(ckpt, rank, 3) for rank in range(3)]
    assert sorted(p for part in per_rank for p in part) == sorted(verify(ckpt))
    assert len(verify(ckpt)) == len(FILES) and all(part for part in per_rank)


def test_a_crashed_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    fake_save(tmp_path, 1)
    fake_save(tmp_path, 2)
    crashed = tmp_dir(tmp_path, 3)  # files written, never committed
    (crashed / "dist").mkdir(parents=True)
    (crashed / "dist" / "__0_0.distcp").write_bytes(b"partial")
    assert read_latest(tmp_path) == "step_00000002"
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_00000002", "step_00000001"]

    fake_save(tmp_path, 3)  # the retried save replaces the leftover
    assert verify(tmp_path / "step_00000003") == [] and not crashed.exists()
    assert read_latest(tmp_path) == "step_00000003"


def test_folders_newer_than_latest_are_not_resumed_from(tmp_path, caplog):
    for step in (1, 2, 3):
        fake_save(tmp_path, step)
    write_latest(tmp_path, step_dir_name(2))  # e.g. a crash between the rename of 3 and the pointer move
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_00000002", "step_00000001"]
    assert "step_00000003 newer than latest (step_00000002)" in caplog.text
    (tmp_path / LATEST_NAME).unlink()
    assert [p.name for p in resume_candidates(tmp_path)] == ["step_00000003", "step_00000002", "step_00000001"]
    assert resume_candidates(tmp_path / "nowhere") == []


def test_latest_is_replaced_atomically_and_only_names_complete_checkpoints(tmp_path):
    fake_save(tmp_path, 0)
    seen, stop = set(), threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            name = (tmp_path / LATEST_NAME).read_text()
            seen.add(name)
            if not name.endswith("\n") or not (tmp_path / name.strip() / MANIFEST_NAME).is_file():
                errors.append(name)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(1, 40):
            fake_save(tmp_path, step, {"a.bin": os.urandom(64)})
    finally:
        stop.set()
        thread.join()
    assert errors == []  # never empty, partial, or pointing at a folder without a manifest
    assert len(seen) > 1 and seen <= {step_dir_name(s) + "\n" for s in range(40)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_keep_last_n_deletes_older_checkpoints_but_never_latest(tmp_path):
    for step in range(1, 6):
        fake_save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_steps(tmp_path)] == [4, 5]

    for step in (6, 7, 8):
        fake_save(tmp_path, step)
    write_latest(tmp_path, step_dir_name(6))  # the run resumed from 6 (7 and 8 are newer: left alone)
    tmp_dir(tmp_path, 9).mkdir()  # a crashed save
    deleted = prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in deleted) == ["step_00000004", "step_00000005", "step_00000009.tmp"]
    assert [s for s, _ in list_steps(tmp_path)] == [6, 7, 8]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        prune(tmp_path, 0)


def test_recommitting_a_step_replaces_it(tmp_path):
    fake_save(tmp_path, 4)
    fake_save(tmp_path, 4, {"other.bin": b"new"})
    ckpt = tmp_path / "step_00000004"
    assert set(read_manifest(ckpt)["files"]) == {"other.bin"} and verify(ckpt) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_NAME, "step_00000004"]
