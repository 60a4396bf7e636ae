"""The R3 routing dump store: exact round trips, partial reads, atomic writes, and one clear error
class for every missing or damaged dump."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from miles.routing.dump_store import (
    RoutingDumpError, RoutingDumpReader, RoutingDumpStore, RoutingDumpWriter, default_dump_root,
)

L, K, E = 3, 2, 16


def experts(rng, tokens: int, num_experts: int = E) -> np.ndarray:
    return rng.integers(0, num_experts, size=(tokens, L, K), dtype=np.int32)


def write_step(store: RoutingDumpStore, step: int, lengths: dict[str, int], seed: int = 0, **kw):
    rng = np.random.default_rng(seed)
    arrays, refs = {}, {}
    with store.writer(step, L, K, kw.pop("num_experts", E), **kw) as w:
        for sid, tokens in lengths.items():
            arrays[sid] = experts(rng, tokens)
            refs[sid] = w.add(sid, arrays[sid])
    return arrays, refs


@pytest.mark.parametrize("chunk_rows", [None, 7])  # one chunk; chunks that split samples
@pytest.mark.parametrize("num_experts,stored", [(16, np.uint8), (300, np.uint16), (None, np.int32)])
def test_round_trip_is_exact_and_stores_the_narrowest_type(tmp_path, num_experts, stored, chunk_rows):
    store = RoutingDumpStore(tmp_path)
    rng = np.random.default_rng(1)
    lengths = {"0-0": 5, "0-1": 17, "1-0": 1, "1-1": 0, "2-0": 40}
    arrays = {sid: experts(rng, t, num_experts or 1000) for sid, t in lengths.items()}
    with store.writer(12, L, K, num_experts, chunk_rows=chunk_rows) as w:
        refs = {sid: w.add(sid, a) for sid, a in arrays.items()}
    assert refs["1-0"] == "step-00000012.h5#1-0"
    assert sorted(os.listdir(tmp_path)) == ["step-00000012.h5"]
    with h5py.File(tmp_path / "step-00000012.h5", "r") as f:
        assert f["experts"].dtype == stored
        assert f["experts"].shape == (63, L, K)
        assert list(f["offsets"][()]) == [0, 5, 22, 23, 23, 63]
        assert f.attrs["num_experts"] == (num_experts or 0)
    order = ["2-0", "1-1", "0-0", "1-0", "0-1"]
    got = store.read([refs[s] for s in order])
    for sid, g in zip(order, got):
        assert g.dtype == np.int32 and g.shape == (lengths[sid], L, K)
        np.testing.assert_array_equal(g, arrays[sid])


def test_read_refs_across_steps_in_the_order_asked(tmp_path):
    store = RoutingDumpStore(tmp_path)
    a3, r3 = write_step(store, 3, {"0-0": 4, "0-1": 6}, seed=3)
    a4, r4 = write_step(store, 4, {"0-0": 7}, seed=4)
    got = store.read([r4["0-0"], r3["0-1"], r3["0-0"]], expected_tokens=[7, 6, None])
    for g, want in zip(got, [a4["0-0"], a3["0-1"], a3["0-0"]]):
        np.testing.assert_array_equal(g, want)
    with pytest.raises(RoutingDumpError, match="not a routing dump ref"):
        store.read("0-0")


def test_subset_read_touches_only_the_requested_samples(tmp_path):
    """One sample per chunk; corrupting sample 1-0's chunk on disk breaks only reads of 1-0."""
    store = RoutingDumpStore(tmp_path)
    lengths = {f"{g}-0": 8 for g in range(4)}
    arrays, _ = write_step(store, 0, lengths, chunk_rows=8)
    path = store.path(0)
    with RoutingDumpReader(path) as r:
        full = r.read(list(lengths))
        np.testing.assert_array_equal(r.read(["2-0", "0-0"])[0], full[2])
    with h5py.File(path, "r") as f:
        info = f["experts"].id.get_chunk_info(1)  # rows 8:16 = sample 1-0
        assert info.chunk_offset[0] == 8
        offset, size = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        flipped = bytes(255 - b for b in fh.read(size))
        fh.seek(offset)
        fh.write(flipped)
    subset = store.read_step(0, ["3-0", "0-0", "2-0"])
    for sid, g in zip(["3-0", "0-0", "2-0"], subset):
        np.testing.assert_array_equal(g, arrays[sid])
    with pytest.raises(RoutingDumpError, match=rf"{path}.*sample 1-0.*damaged"):
        store.read_step(0, ["1-0"])


@pytest.mark.parametrize("bad,match", [
    (np.zeros((4, L + 1, K), np.int32), r"shape \(4, 4, 2\); expected \[tokens, 3, 2\]"),
    (np.zeros((4, L, K + 1), np.int32), r"shape \(4, 3, 3\)"),
    (np.zeros((4, L * K), np.int32), r"shape \(4, 6\)"),
    (np.zeros((4, L, K), np.float32), r"dtype float32"),
    (np.full((4, L, K), E, np.int64), rf"ids in \[{E}, {E}\], outside \[0, {E}\)"),
    (np.full((4, L, K), -1, np.int32), r"ids in \[-1, -1\]"),
])
def test_write_rejects_arrays_that_do_not_match_the_model(tmp_path, bad, match):
    with RoutingDumpWriter(tmp_path, 1, L, K, E) as w:
        w.add("0-0", np.zeros((2, L, K), np.int64))  # any integer dtype is accepted
        with pytest.raises(RoutingDumpError, match=match) as err:
            w.add("7-1", bad)
        assert "sample 7-1" in str(err.value)
        with pytest.raises(RoutingDumpError, match="sample 0-0 was already added"):
            w.add("0-0", np.zeros((2, L, K), np.int32))
    assert RoutingDumpStore(tmp_path).read_step(1, ["0-0"])[0].shape == (2, L, K)


def test_missing_sample_missing_file_and_wrong_length_are_errors(tmp_path):
    store = RoutingDumpStore(tmp_path)
    write_step(store, 5, {"0-0": 3})
    with pytest.raises(RoutingDumpError, match=r"sample 9-9 is missing from .*step-00000005\.h5"):
        store.read_step(5, ["0-0", "9-9"])
    with pytest.raises(RoutingDumpError, match=r"step-00000006\.h5 is missing.*step 6.*enable-return-routed-experts"):
        store.read("step-00000006.h5#0-0")
    with pytest.raises(RoutingDumpError, match=r"sample 0-0 in .* has 3 token positions, the sample has 4"):
        store.read_step(5, ["0-0"], expected_tokens=[4])


def test_truncated_file_is_an_error_naming_the_path(tmp_path):
    store = RoutingDumpStore(tmp_path)
    write_step(store, 2, {"0-0": 50, "0-1": 50})
    path = store.path(2)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(RoutingDumpError, match=rf"{path} is not a readable HDF5 file.*truncated or corrupt"):
        store.read_step(2, ["0-0"])


def test_wrong_dtype_or_shape_in_the_file_is_an_error(tmp_path):
    store = RoutingDumpStore(tmp_path)
    write_step(store, 2, {"0-0": 4})
    with h5py.File(store.path(2), "r+") as f:
        del f["experts"]
        f.create_dataset("experts", data=np.zeros((4, L, K), np.float32))
    with pytest.raises(RoutingDumpError, match=rf"{store.path(2)} is damaged: dataset `experts` has dtype float32"):
        store.read_step(2, ["0-0"])
    with h5py.File(store.path(2), "r+") as f:
        del f["experts"]
        f.create_dataset("experts", data=np.zeros((4, L, K + 1), np.int32))
    with pytest.raises(RoutingDumpError, match=r"has shape \(4, 3, 3\), expected \[N, 3, 2\]"):
        store.read_step(2, ["0-0"])
    with h5py.File(store.path(2), "r+") as f:
        del f["offsets"]
    with pytest.raises(RoutingDumpError, match="index is unreadable"):
        store.read_step(2, ["0-0"])


def test_exception_inside_with_leaves_no_file(tmp_path):
    store = RoutingDumpStore(tmp_path / "r3")
    with pytest.raises(KeyError):
        with store.writer(7, L, K, E) as w:
            w.add("0-0", np.zeros((3, L, K), np.int32))
            assert not store.path(7).exists()  # invisible until the with exits cleanly
            assert len(list((tmp_path / "r3").iterdir())) == 1  # the temp file
            raise KeyError("boom")
    assert list((tmp_path / "r3").iterdir()) == []
    assert store.pending_steps() == []


def test_pending_and_delete_steps(tmp_path):
    store = RoutingDumpStore(tmp_path)
    for step in (10, 2, 7):
        write_step(store, step, {"0-0": 2})
    (tmp_path / ".step-00000009.h5.123.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("x")
    assert store.pending_steps() == [2, 7, 10]
    assert store.delete_step(7) is True
    assert store.delete_step(7) is False
    assert store.pending_steps() == [2, 10]


def test_export_import_round_trip(tmp_path):
    store = RoutingDumpStore(tmp_path / "node0")
    a1, r1 = write_step(store, 1, {"0-0": 5, "0-1": 9}, seed=1)
    write_step(store, 2, {"1-0": 3}, seed=2)
    ckpt = tmp_path / "ckpt" / "r3"
    assert store.export_steps([1], ckpt) == [ckpt / "step-00000001.h5"]
    with pytest.raises(RoutingDumpError, match="step-00000004.h5 is missing"):
        store.export_steps([2, 4], tmp_path / "other")
    assert not (tmp_path / "other").exists()  # nothing copied when one step is missing
    fresh = RoutingDumpStore(tmp_path / "node1")
    assert fresh.import_steps(ckpt) == [1]
    assert fresh.pending_steps() == [1]
    for g, sid in zip(fresh.read([r1["0-1"], r1["0-0"]]), ["0-1", "0-0"]):
        np.testing.assert_array_equal(g, a1[sid])
    assert sorted(os.listdir(tmp_path / "node1")) == ["step-00000001.h5"]


def test_bytes_per_token_reflects_the_narrow_storage(tmp_path):
    store = RoutingDumpStore(tmp_path)
    write_step(store, 0, {f"{i}-0": 5000 for i in range(4)}, chunk_rows=1000)
    bpt = store.bytes_per_token(0)
    assert L * K * 1 <= bpt < L * K * 1.25  # uint8 ids + checksum/index overhead, vs 24 B/token as int32


def test_default_dump_root():
    assert default_dump_root({"SLURM_TMPDIR": "/local/job9", "SLURM_JOB_ID": "9"}) == Path("/local/job9/miles-r3")
    assert default_dump_root({"SLURM_JOB_ID": "42", "TMPDIR": "/scratch"}) == Path("/scratch/miles-r3-42")
    assert default_dump_root({}) == Path(f"/tmp/miles-r3-{os.getpid()}")
    assert RoutingDumpStore(None).root == default_dump_root()
