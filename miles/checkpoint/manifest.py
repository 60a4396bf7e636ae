"""The checkpoint manifest: size and sha256 of every file, written last, and its verification.

    step_00000012/manifest.json
    {"format_version": 1, "step": 12, "created": "2025-01-01T00:00:00+00:00", "created_unix": 1735689600.0,
     "config_sha256": "...", "files": {"dist/__0_0.distcp": {"size": 123, "sha256": "..."}, ...}}

A checkpoint folder without a readable manifest is incomplete by definition: the manifest is the
last file written into it (atomically: temp file, fsync, rename). `verify` reports every file
that is missing, has the wrong size (a truncated copy or write) or the wrong sha256. Files not
listed in the manifest are ignored. Hashing can be shared out over ranks (`rank`, `world_size`):
each checks every world_size-th file, the caller gathers the problems.
"""

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from miles.atomic_file import atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a checkpoint folder."""
FORMAT_VERSION = 1
"""Manifest format written by this code; verify refuses others."""
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a UTF-8 string (the resolved config's hash)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def list_files(ckpt_dir: Path) -> list[str]:
    """Every regular file under ckpt_dir except the manifest, as sorted POSIX paths relative to it."""
    ckpt_dir = Path(ckpt_dir)
    out = []
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = (Path(root) / name).relative_to(ckpt_dir).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def describe_files(ckpt_dir: Path, rel_paths: list[str]) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of the given files, each fsynced first (durable before listed)."""
    out = {}
    for rel in rel_paths:
        path = Path(ckpt_dir) / rel
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def write_manifest(ckpt_dir: Path, step: int, files: dict[str, dict], config_sha256: str) -> Path:
    """Write ckpt_dir/manifest.json atomically (temp file + fsync + rename + fsync of the folder)."""
    now = time.time()
    manifest = {
        "format_version": FORMAT_VERSION, "step": step,
        "created": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"), "created_unix": now,
        "config_sha256": config_sha256, "files": dict(sorted(files.items())),
    }
    target = Path(ckpt_dir) / MANIFEST_NAME
    atomic_write_text(target, json.dumps(manifest, indent=1) + "\n")
    return target


def read_manifest(ckpt_dir: Path) -> dict:
    """The parsed manifest; raises ValueError naming the file when it is missing, unreadable or malformed."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"missing {path} (the save did not finish)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {path}: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"malformed {path}: no \"files\" table")
    for rel, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"malformed {path}: entry {rel!r} lacks an integer size and a sha256")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}; this code reads "
                         f"{FORMAT_VERSION}")
    return manifest


def verify(ckpt_dir: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems found in a checkpoint folder (empty = intact).

    Checks that the manifest is readable, then the files with index % world_size == rank (all of
    them by default): present, of the recorded size, of the recorded sha256.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)
    except ValueError as e:
        return [str(e)]
    problems = []
    for i, (rel, entry) in enumerate(sorted(manifest["files"].items())):
        if i % world_size != rank:
            continue
        path = ckpt_dir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"missing file {path}")
            continue
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "size mismatch in"
            problems.append(f"{what} {path}: expected {entry['size']} bytes, got {size}")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(f"checksum mismatch in {path}: expected sha256 {entry['sha256']}, got {actual}")
    return problems
