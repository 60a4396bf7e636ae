"""The forced-save sentinel: a file whose existence asks for a checkpoint at the next step boundary.

    path = cfg.checkpoint.sentinel_path(run_dir)
    if cfg.checkpoint.is_due(step) or save_requested(path):
        save_checkpoint(...)
        clear_sentinel(path)      # only after the checkpoint is committed (durable)

Both calls are collective: rank 0 looks at the filesystem and every rank gets its answer, so all
ranks take the same branch (one rank seeing the file late would otherwise hang the others).
"""

import logging
from pathlib import Path

from miles.checkpoint import ranks

logger = logging.getLogger(__name__)


def save_requested(path: Path | None) -> bool:
    """Collective: whether the sentinel file exists (False when `path` is None: sentinel disabled)."""
    found = path is not None and Path(path).exists() if ranks.rank() == 0 else None
    found = bool(ranks.broadcast_from_0(found))
    if found:
        logger.info("sentinel %s found: saving a checkpoint now", path)
    return found


def clear_sentinel(path: Path | None) -> None:
    """Collective: delete the sentinel (call after the forced checkpoint is committed)."""
    if path is not None and ranks.rank() == 0:
        Path(path).unlink(missing_ok=True)
    ranks.barrier()
