"""Stacked refs: the view of several roots, later on top (MASK entries hide what is below).

Pure manifest work (content-addressed nodes): no projection, no I/O beyond LMDB.
"""

from __future__ import annotations

from collections.abc import Sequence

from veloverlay.errors import Reason, VeloError
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind

__all__ = ["stack_roots"]


# --- stacked refs ------------------------------------------------------------------------------
def stack_roots(m: Manifests, txn: Txn, roots: Sequence[bytes]) -> bytes:
    """The view of refs stacked bottom to top (later wins, MASK hides what is below).

    Writes the merged directory nodes (content-addressed, so harmless to add) and returns the
    merged root. One root is returned as is. Needs a write transaction.
    """
    if not roots:
        raise VeloError("no roots to stack", reason=Reason.USAGE)
    merged = roots[0]
    for upper in roots[1:]:
        merged = _overlay_nodes(m, txn, merged, upper)
    return merged


def _overlay_nodes(m: Manifests, txn: Txn, lower: bytes, upper: bytes) -> bytes:
    lo, up = m.get_node(txn, lower), m.get_node(txn, upper)
    entries = lo.as_dict()
    for e in up.entries:
        below = entries.get(e.name)
        if e.kind is Kind.MASK:
            entries.pop(e.name, None)
        elif e.kind is Kind.DIR and below is not None and below.kind is Kind.DIR:
            entries[e.name] = Entry(
                e.name, Kind.DIR, digest=_overlay_nodes(m, txn, below.digest, e.digest)
            )
        else:
            entries[e.name] = e
    return m.put_node(txn, up.mode, up.mtime_ns, entries.values())
