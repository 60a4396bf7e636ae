"""Node-local HDF5 store of routed experts between rollout and training (R3, Rollout Routing Replay).

Tensor legend: T = token positions of one sample (prompt + response - 1: the last sampled token
never went through the model), L = MoE layers, K = experts per token (top_k), N = the rows of all
samples of one step, concatenated.

Layout: one file per RL step, `<root>/step-<step:08d>.h5`, holding
  - `experts`    [N, L, K]  routed expert ids of every sample, concatenated in `add` order
  - `sample_ids` [n]        variable-length UTF-8 strings, "<group_id>-<index>"
  - `offsets`    [n + 1]    int64; sample i owns rows offsets[i]:offsets[i+1] of `experts`
  - attrs        format_version, step, num_layers, top_k, num_experts (0 = unknown)
A sample's reference (what `Sample.routed_experts_ref` holds) is "step-00000012.h5#3-1": the file
name relative to the store root, so a store can move (checkpoint export/import) without
rewriting samples.

Storage choice, measured with tools/bench_r3_store.py (256 samples x 1024 tokens, L=48, K=8,
uniform random ids, 2 shared CPU cores, page cache; int32-equivalent MB/s): ids are stored in the
narrowest unsigned type that holds `num_experts` (uint8 up to 256 experts, uint16 up to 65536,
int32 when `num_experts` is unknown), uncompressed, with HDF5's fletcher32 checksum per chunk.
  128 experts, uint8:         385 B/token (x3.99 vs int32), write 0.6-1.1 GB/s, read 1-2 GB/s
    + lzf:                    same size (the bytes are already dense), write ~3.5x slower
    + shuffle+gzip:           x4.56, write ~10x slower, read 5-10x slower
  384 experts, uint16:        x2.00; lzf x2.66, gzip x3.41, each at 4-10x the CPU
A top-k id carries ~log2(num_experts) bits, which the narrow type nearly fills, so the narrow type
is the compression that pays; a general-purpose filter on top shrinks files by at most ~40% more,
for several times the CPU on the rollout node and every trainer rank. `compression=` ("lzf",
"gzip") exposes h5py's filters (with shuffle) for larger expert counts or tighter disks. Readers always get int32,
SGLang's layout. The checksum turns a flipped bit on disk into an error, not a silently wrong
routing replay.

Chunks are ~256 KiB along N so a trainer rank that reads only its micro-batches' samples fetches
little beyond their rows (HDF5 reads whole chunks). The last chunk is stored whole, so a file
carries up to one chunk of padding (noise next to a real step's hundreds of MB).

Writes are atomic: `RoutingDumpWriter` writes `.step-<step>.h5.<pid>.tmp` and renames it on a clean
exit of its `with`; an exception removes the temp file, so a half-written dump is never visible.

Reads open files with HDF5 file locking off, so many ranks read one file concurrently (node-local
disks; the file is immutable once renamed).

A missing or damaged dump is an error (`RoutingDumpError`), never regenerated: the routing that
must be replayed is the one the rollout weights chose, and those weights are gone after the step
trains. The message names the file, the sample and the likely cause.
"""

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from miles.atomic_file import fsync_dir
from miles.cluster.slurm_env import SlurmEnv

FORMAT_VERSION = 1
"""Bumped when the layout above changes; readers reject other versions."""
CHUNK_BYTES = 256 * 1024
"""Target chunk size along N (see module docstring)."""
STEP_PREFIX, STEP_SUFFIX = "step-", ".h5"


class RoutingDumpError(ValueError):
    """A routing dump is missing, damaged or does not match the samples; the message says which and why."""


def default_dump_root(env: Mapping[str, str] | None = None) -> Path:
    """Where dumps go when the config names no `r3.dump_dir`.

    $SLURM_TMPDIR/miles-r3 when SLURM_TMPDIR is set (node-local scratch on clusters that provide
    it), else <$TMPDIR or /tmp>/miles-r3-<SLURM_JOB_ID, or this process's pid outside Slurm>.
    """
    env = os.environ if env is None else env
    if env.get("SLURM_TMPDIR"):
        return Path(env["SLURM_TMPDIR"]) / "miles-r3"
    slurm = SlurmEnv(env)
    job = str(slurm.job_id) if slurm.in_job else str(os.getpid())
    return Path(env.get("TMPDIR") or "/tmp") / f"miles-r3-{job}"


def step_file_name(step: int) -> str:
    """"step-00000012.h5" for step 12."""
    return f"{STEP_PREFIX}{step:08d}{STEP_SUFFIX}"


def storage_dtype(num_experts: int | None) -> np.dtype:
    """The narrowest type that holds every expert id (int32 when the expert count is unknown)."""
    if num_experts is None:
        return np.dtype(np.int32)
    for dtype in (np.uint8, np.uint16):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int32)


class RoutingDumpWriter:
    """Writes one step's file; use as a context manager, `add` once per sample.

        with RoutingDumpWriter(root, step=12, num_layers=48, top_k=8, num_experts=128) as w:
            sample.routed_experts_ref = w.add(sample.sample_id, experts_TLK)
    """

    def __init__(self, root: str | os.PathLike, step: int, num_layers: int, top_k: int,
                 num_experts: int | None = None, compression: str | None = None,
                 chunk_rows: int | None = None):
        if step < 0 or num_layers < 1 or top_k < 1 or (num_experts is not None and num_experts < top_k):
            raise RoutingDumpError(f"bad dump geometry: step={step} num_layers={num_layers} top_k={top_k} "
                                   f"num_experts={num_experts} (need step >= 0, layers and top_k >= 1, "
                                   "num_experts >= top_k)")
        self.root, self.step = Path(root), step
        self.num_layers, self.top_k, self.num_experts = num_layers, top_k, num_experts
        self.path = self.root / step_file_name(step)
        self._tmp = self.root / f".{self.path.name}.{os.getpid()}.tmp"
        self._dtype = storage_dtype(num_experts)
        row_bytes = num_layers * top_k * self._dtype.itemsize
        self._chunk_rows = chunk_rows or max(1, CHUNK_BYTES // row_bytes)
        self._compression = compression
        self._file: h5py.File | None = None
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._offsets: list[int] = [0]
        self._pending: list[np.ndarray] = []  # rows added but not yet written (< one chunk)

    def __enter__(self) -> "RoutingDumpWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self._tmp, "w")
        self._experts = self._file.create_dataset(
            "experts", shape=(0, self.num_layers, self.top_k), maxshape=(None, self.num_layers, self.top_k),
            dtype=self._dtype, chunks=(self._chunk_rows, self.num_layers, self.top_k),
            compression=self._compression, shuffle=self._compression is not None, fletcher32=True)
        return self

    def add(self, sample_id: str, experts_TLK: np.ndarray) -> str:
        """Append one sample's routed experts; returns the ref for `Sample.routed_experts_ref`."""
        if self._file is None:
            raise RuntimeError("RoutingDumpWriter.add outside its `with` block")
        experts_TLK = self._validated(sample_id, experts_TLK)
        if sample_id in self._index:
            raise RoutingDumpError(f"sample {sample_id} was already added to step {self.step}'s routing dump "
                                   "(sample ids must be unique within a step)")
        self._pending.append(experts_TLK.astype(self._dtype))
        self._index[sample_id] = len(self._ids)
        self._ids.append(sample_id)
        self._offsets.append(self._offsets[-1] + experts_TLK.shape[0])
        self._flush(whole_chunks_only=True)
        return f"{self.path.name}#{sample_id}"

    def _flush(self, whole_chunks_only: bool) -> None:
        """Append buffered rows to `experts`, whole chunks only until close: each chunk is written
        once (no read-modify-write of partial chunks, no space leaked by rewritten compressed ones)."""
        written, buffered = self._experts.shape[0], self._offsets[-1]
        end = written + (buffered - written) // self._chunk_rows * self._chunk_rows if whole_chunks_only else buffered
        if end == written:
            return
        rows_NLK = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._experts.resize(end, axis=0)
        self._experts[written:end] = rows_NLK[:end - written]
        self._pending = [rows_NLK[end - written:].copy()]  # < one chunk; frees the concatenation

    def _validated(self, sample_id: str, experts_TLK: np.ndarray) -> np.ndarray:
        experts_TLK = np.asarray(experts_TLK)
        if experts_TLK.dtype.kind not in "iu":
            raise RoutingDumpError(f"routed experts of sample {sample_id} have dtype {experts_TLK.dtype}; "
                                   "expected integer expert ids (int32 from decode_routed_experts)")
        if experts_TLK.ndim != 3 or experts_TLK.shape[1:] != (self.num_layers, self.top_k):
            raise RoutingDumpError(
                f"routed experts of sample {sample_id} have shape {tuple(experts_TLK.shape)}; expected "
                f"[tokens, {self.num_layers}, {self.top_k}] (num_layers, top_k of the model: does the engine "
                "serve the same model as the trainer?)")
        if experts_TLK.size:
            low, high = int(experts_TLK.min()), int(experts_TLK.max())
            limit = self.num_experts if self.num_experts is not None else np.iinfo(np.int32).max + 1
            if low < 0 or high >= limit:
                raise RoutingDumpError(f"routed experts of sample {sample_id} hold ids in [{low}, {high}], "
                                       f"outside [0, {limit}): wrong num_experts, or a corrupt engine response")
        return experts_TLK

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        try:
            if exc_type is None:
                self._flush(whole_chunks_only=False)
                self._file.create_dataset("sample_ids", data=self._ids, dtype=h5py.string_dtype("utf-8"))
                self._file.create_dataset("offsets", data=np.asarray(self._offsets, dtype=np.int64))
                self._file.attrs.update({"format_version": FORMAT_VERSION, "step": self.step,
                                         "num_layers": self.num_layers, "top_k": self.top_k,
                                         "num_experts": self.num_experts or 0})
            self._file.close()
            self._file = None
            if exc_type is None:
                _fsync_file(self._tmp)
                os.replace(self._tmp, self.path)
                fsync_dir(self.root)
        finally:
            if self._file is not None:
                self._file.close()
            self._tmp.unlink(missing_ok=True)


class RoutingDumpReader:
    """One step's file, opened read-only without HDF5 locking; use as a context manager.

    The index (ids, offsets, attrs) is read and checked on open; `read` fetches only the rows of
    the samples asked for.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise RoutingDumpError(
                f"routing dump {self.path} is missing: was step {_step_of(self.path)} rolled out with routed "
                "experts (engine --enable-return-routed-experts), or was the file deleted (or left on "
                "another node / not imported from the checkpoint) before training?")
        try:
            self._file = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise RoutingDumpError(f"routing dump {self.path} is not a readable HDF5 file ({exc}): it is "
                                   "truncated or corrupt; roll the step out again from its checkpoint") from exc
        try:
            self._load_index()
        except BaseException:
            self._file.close()
            raise

    def _load_index(self) -> None:
        f = self._file
        try:
            attrs = {k: int(f.attrs[k]) for k in ("format_version", "step", "num_layers", "top_k", "num_experts")}
            self._experts = f["experts"]
            ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f["sample_ids"][()]]
            offsets = np.asarray(f["offsets"][()])
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise self._damaged(f"its index is unreadable ({exc})") from exc
        if attrs["format_version"] != FORMAT_VERSION:
            raise self._damaged(f"format_version {attrs['format_version']}, this Miles reads {FORMAT_VERSION}")
        self.step, self.num_layers, self.top_k = attrs["step"], attrs["num_layers"], attrs["top_k"]
        self.num_experts = attrs["num_experts"] or None
        dtype = self._experts.dtype
        if dtype.kind not in "iu" or dtype.itemsize > 4 or (dtype.kind == "u" and dtype.itemsize == 4):
            raise self._damaged(f"dataset `experts` has dtype {dtype}, expected an integer type that fits int32")
        if self._experts.ndim != 3 or self._experts.shape[1:] != (self.num_layers, self.top_k):
            raise self._damaged(f"dataset `experts` has shape {self._experts.shape}, expected "
                                f"[N, {self.num_layers}, {self.top_k}] from its attrs")
        if (offsets.dtype.kind != "i" or offsets.shape != (len(ids) + 1,) or offsets[0] != 0
                or np.any(np.diff(offsets) < 0) or offsets[-1] != self._experts.shape[0]):
            raise self._damaged(f"offsets {offsets.dtype}{offsets.shape} do not index {len(ids)} samples "
                                f"over {self._experts.shape[0]} rows")
        self.sample_ids, self._offsets = ids, offsets
        self._index = {sid: i for i, sid in enumerate(ids)}

    def _damaged(self, what: str, sample_id: str | None = None) -> RoutingDumpError:
        who = f" (sample {sample_id})" if sample_id is not None else ""
        return RoutingDumpError(f"routing dump {self.path}{who} is damaged: {what}; roll step "
                                f"{_step_of(self.path)} out again from its checkpoint")

    @property
    def num_tokens(self) -> int:
        """Token positions over all samples (rows of `experts`)."""
        return int(self._offsets[-1])

    @property
    def bytes_per_token(self) -> float:
        """File size on disk per token position (index and metadata included)."""
        return self.path.stat().st_size / max(1, self.num_tokens)

    def read(self, sample_ids: Sequence[str], expected_tokens: Sequence[int | None] | None = None
             ) -> list[np.ndarray]:
        """int32 [T, L, K] per sample id, in the order asked; only those samples' rows are read.

        expected_tokens[i], when given and not None, must equal T of sample i
        (len(prompt_tokens) + len(response_tokens) - 1).
        """
        if expected_tokens is not None and len(expected_tokens) != len(sample_ids):
            raise ValueError(f"{len(expected_tokens)} expected_tokens for {len(sample_ids)} sample ids")
        rows = []
        for sid in sample_ids:
            if sid not in self._index:
                raise RoutingDumpError(
                    f"the routing dump of sample {sid} is missing from {self.path} ({len(self.sample_ids)} "
                    "samples): was it rolled out in another step, or without return_routed_experts?")
            i = self._index[sid]
            rows.append((int(self._offsets[i]), int(self._offsets[i + 1])))
        out = self._read_rows(sample_ids, rows)
        for i, (sid, experts_TLK) in enumerate(zip(sample_ids, out)):
            want = None if expected_tokens is None else expected_tokens[i]
            if want is not None and experts_TLK.shape[0] != want:
                raise RoutingDumpError(
                    f"the routing dump of sample {sid} in {self.path} has {experts_TLK.shape[0]} token positions, "
                    f"the sample has {want} (prompt + response - 1): were its tokens changed after rollout?")
            if self.num_experts is not None and experts_TLK.size and int(experts_TLK.max()) >= self.num_experts:
                raise self._damaged(f"expert id {int(experts_TLK.max())} >= num_experts {self.num_experts}", sid)
        return out

    def _read_rows(self, sample_ids: Sequence[str], rows: list[tuple[int, int]]) -> list[np.ndarray]:
        """Read each maximal run of adjacent requested rows with one HDF5 call, then split per sample."""
        order = sorted(range(len(rows)), key=lambda j: rows[j])
        out: list[np.ndarray | None] = [None] * len(rows)
        j = 0
        while j < len(order):
            run = [order[j]]
            while j + 1 < len(order) and rows[order[j + 1]][0] == rows[run[-1]][1]:
                j += 1
                run.append(order[j])
            start, end = rows[run[0]][0], rows[run[-1]][1]
            try:
                block_NLK = self._experts[start:end].astype(np.int32, copy=False)
            except OSError as exc:
                raise self._damaged(f"rows {start}:{end} fail to read ({exc})",
                                    ", ".join(sample_ids[k] for k in run)) from exc
            for k in run:
                out[k] = block_NLK[rows[k][0] - start:rows[k][1] - start]
            j += 1
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RoutingDumpReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RoutingDumpStore:
    """The folder of step files: write, read by ref, delete trained steps, carry untrained ones
    through a checkpoint."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_dump_root()

    def path(self, step: int) -> Path:
        return self.root / step_file_name(step)

    def writer(self, step: int, num_layers: int, top_k: int, num_experts: int | None = None,
               **kwargs) -> RoutingDumpWriter:
        return RoutingDumpWriter(self.root, step, num_layers, top_k, num_experts, **kwargs)

    def read_step(self, step: int, sample_ids: Sequence[str],
                  expected_tokens: Sequence[int | None] | None = None) -> list[np.ndarray]:
        """int32 [T, L, K] for each sample id of `step`, in order."""
        with RoutingDumpReader(self.path(step)) as reader:
            return reader.read(sample_ids, expected_tokens)

    def read(self, refs: str | Sequence[str], expected_tokens: Sequence[int | None] | None = None
             ) -> list[np.ndarray]:
        """int32 [T, L, K] for each ref ("step-00000012.h5#3-1"), in order; each file opened once."""
        refs = [refs] if isinstance(refs, str) else list(refs)
        by_file: dict[str, list[int]] = {}
        ids = []
        for j, ref in enumerate(refs):
            name, sep, sid = ref.partition("#")
            if not sep or not sid or not (name.startswith(STEP_PREFIX) and name.endswith(STEP_SUFFIX)) or "/" in name:
                raise RoutingDumpError(f"{ref!r} is not a routing dump ref (expected 'step-<8 digits>.h5#<sample_id>')")
            by_file.setdefault(name, []).append(j)
            ids.append(sid)
        out: list[np.ndarray | None] = [None] * len(refs)
        for name, js in by_file.items():
            want = None if expected_tokens is None else [expected_tokens[j] for j in js]
            with RoutingDumpReader(self.root / name) as reader:
                for j, experts_TLK in zip(js, reader.read([ids[j] for j in js], want)):
                    out[j] = experts_TLK
        return out  # type: ignore[return-value]

    def pending_steps(self) -> list[int]:
        """Steps with a complete dump in the store (written and not yet deleted), ascending."""
        return sorted(s for s in (_step_of(p) for p in self.root.glob(f"{STEP_PREFIX}*{STEP_SUFFIX}")) if s is not None)

    def delete_step(self, step: int) -> bool:
        """Remove a trained step's dump; False when there was none."""
        try:
            self.path(step).unlink()
        except FileNotFoundError:
            return False
        return True

    def bytes_per_token(self, step: int) -> float:
        with RoutingDumpReader(self.path(step)) as reader:
            return reader.bytes_per_token

    def export_steps(self, steps: Sequence[int], dest_dir: str | os.PathLike) -> list[Path]:
        """Copy these steps' dumps into dest_dir (e.g. a checkpoint folder), each atomically."""
        for step in steps:
            RoutingDumpReader(self.path(step)).close()  # fail before copying anything
        return [_atomic_copy(self.path(step), Path(dest_dir)) for step in steps]

    def import_steps(self, src_dir: str | os.PathLike) -> list[int]:
        """Copy every step dump found in src_dir into the store (validated first); returns their steps."""
        sources = sorted(Path(src_dir).glob(f"{STEP_PREFIX}*{STEP_SUFFIX}"))
        steps = []
        for src in sources:
            with RoutingDumpReader(src) as reader:
                if reader.step != _step_of(src):
                    raise reader._damaged(f"its attrs say step {reader.step}, its name says {_step_of(src)}")
                steps.append(reader.step)
        for src in sources:
            _atomic_copy(src, self.root)
        return steps


def _step_of(path: Path) -> int | None:
    digits = path.name[len(STEP_PREFIX):-len(STEP_SUFFIX)]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_copy(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    target, tmp = dest_dir / src.name, dest_dir / f".{src.name}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(src, tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest_dir)
    return target
