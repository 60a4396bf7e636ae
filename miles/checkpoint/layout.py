"""Checkpoint folder layout, the atomic commit, the `latest` pointer and keep-last-N.

    <root>/
      latest                   text file: "step_00000012"; replaced atomically (os.replace), and only
                               after that checkpoint's manifest is written
      step_00000012/           a committed checkpoint (see miles.checkpoint.store for its contents)
      step_00000016.tmp/       a save in progress (or one that crashed: removed at the next commit)

A save writes everything into step_N.tmp/, then `commit` hashes every file (ranks share the
work), writes manifest.json last, renames step_N.tmp -> step_N, moves `latest`, and prunes. A
crash at any point leaves `latest` on the previous complete checkpoint. Resume order
(`resume_candidates`): the checkpoint `latest` names, then older ones, newest first; folders newer
than `latest` were never committed as the run's state (a crash between the rename and the
pointer move, or a timeline the run resumed away from) and are neither resumed from nor pruned.
"""

import logging
import re
import shutil
from pathlib import Path

from miles.checkpoint import ranks
from miles.atomic_file import atomic_write_text, fsync_dir
from miles.checkpoint.manifest import describe_files, list_files, write_manifest

logger = logging.getLogger(__name__)

LATEST_NAME = "latest"
"""File in the checkpoint root naming the newest committed checkpoint folder."""
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_LEFTOVER = re.compile(r"^step_\d{8,}\.(tmp|replaced)$")


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint taken after RL step `step`."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    """Where the save of `step` is written before it is committed."""
    return Path(root) / f"{step_dir_name(step)}.tmp"


def list_steps(root: Path) -> list[tuple[int, Path]]:
    """Committed-looking checkpoint folders (step_N, no suffix), oldest first. Not verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def read_latest(root: Path) -> str | None:
    """The folder name `latest` holds, or None when there is no (valid) pointer."""
    path = Path(root) / LATEST_NAME
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not _STEP_DIR.match(name):
        logger.warning("%s holds %r, not a checkpoint folder name; ignoring it", path, name)
        return None
    return name


def write_latest(root: Path, name: str) -> None:
    """Point `latest` at folder `name` atomically (readers see the old or the new name, never a mix)."""
    assert _STEP_DIR.match(name), name
    atomic_write_text(Path(root) / LATEST_NAME, name + "\n")


def resume_candidates(root: Path) -> list[Path]:
    """Checkpoint folders to try on resume, in order: `latest`'s, then older ones newest first."""
    steps = list_steps(root)
    latest = read_latest(root)
    if latest is None:
        if steps:
            logger.warning("%s has checkpoint folders but no %s pointer; trying them newest first",
                           root, LATEST_NAME)
        return [p for _, p in reversed(steps)]
    latest_step = int(_STEP_DIR.match(latest).group(1))
    newer = [p.name for s, p in steps if s > latest_step]
    if newer:
        logger.warning("%s: %s newer than latest (%s) were never committed as the run's state; not resuming "
                       "from them", root, ", ".join(newer), latest)
    if not (Path(root) / latest).is_dir():
        logger.warning("%s/%s points to %s, which does not exist", root, LATEST_NAME, latest)
    return [p for s, p in reversed(steps) if s <= latest_step]


def commit(root: Path, step: int, config_sha256: str, keep_last: int | None = None) -> Path:
    """Collective: turn the finished step_N.tmp/ into the committed checkpoint step_N/; returns its path.

    Every rank hashes its share of the files; rank 0 writes manifest.json (last), renames the
    folder (moving an existing step_N aside first, e.g. a damaged one the run resumed before),
    points `latest` at it and keeps the `keep_last` newest checkpoints (None = keep all). An error
    on rank 0 is raised on every rank.
    """
    root = Path(root)
    tmp, final = tmp_dir(root, step), root / step_dir_name(step)
    ranks.barrier()  # every rank's files are written (and fsynced by their writers)
    files = ranks.broadcast_from_0(list_files(tmp) if ranks.rank() == 0 else None)
    mine = describe_files(tmp, files[ranks.rank()::ranks.world_size()])
    described = {rel: entry for part in ranks.gather_all(mine) for rel, entry in part.items()}
    error, cause = None, None
    if ranks.rank() == 0:
        try:
            write_manifest(tmp, step, described, config_sha256)
            _rename_into_place(tmp, final)
            write_latest(root, final.name)
            if keep_last is not None:
                prune(root, keep_last)
        except Exception as e:  # rank boundary: re-raised below on every rank, not swallowed
            logger.exception("committing checkpoint %s failed", final)
            error, cause = f"committing checkpoint {final} failed on rank 0: {e}", e
    error = ranks.broadcast_from_0(error)
    if error is not None:
        raise RuntimeError(error) from cause
    return final


def _rename_into_place(tmp: Path, final: Path) -> None:
    aside = final.with_name(final.name + ".replaced")
    if final.exists():
        logger.warning("replacing the existing checkpoint %s", final)
        if aside.exists():
            shutil.rmtree(aside)
        final.rename(aside)
    tmp.rename(final)
    fsync_dir(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete committed checkpoints older than the `keep_last` newest at or below `latest` (never
    `latest`'s own, never newer ones), and leftovers of crashed saves; returns what was deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    latest = read_latest(root)
    if latest is None:
        return []  # nothing is committed: no basis to decide what is old
    latest_step = int(_STEP_DIR.match(latest).group(1))
    committed = [p for s, p in list_steps(root) if s <= latest_step]
    doomed = [p for p in committed[:-keep_last] if p.name != latest]
    doomed += [p for p in root.iterdir() if p.is_dir() and _LEFTOVER.match(p.name)]
    for path in doomed:
        logger.info("deleting old checkpoint data %s", path)
        shutil.rmtree(path)
    return doomed
