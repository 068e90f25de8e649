"""snapshot(root): rel -> [kind, mode, mtime_ns, content sha256 | symlink target | None].

Self-contained (stdlib only): it also runs as a script inside sessions, under the shim, where it
prints the tree the session's processes see as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from typing import Any


def snapshot(root: str) -> dict[str, list[Any] | None]:
    """An entry in a directory this process cannot search (0600, 0100 dirs of its own) is None:
    its name is seen, nothing else; a directory it cannot list (000, 0300) has `DIR/*`: None,
    nothing below it is seen."""
    out: dict[str, list[Any] | None] = {}

    def unlisted(exc: OSError) -> None:
        out[os.path.relpath(exc.filename, root) + "/*"] = None

    for dirpath, dirnames, filenames in [(root, [], ["."]), *os.walk(root, onerror=unlisted)]:
        for name in dirnames + filenames:
            p = root if name == "." else os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except PermissionError:
                out[rel] = None
                continue
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ["dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns, None]
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ["symlink", 0, st.st_mtime_ns, os.readlink(p)]
            elif not stat.S_ISREG(st.st_mode):
                continue  # a fifo, socket or device: not modelled (and opening a fifo blocks)
            else:
                try:
                    with open(p, "rb") as f:
                        digest: str | None = hashlib.sha256(f.read()).hexdigest()
                except PermissionError:
                    digest = None
                out[rel] = ["file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, digest]
    return out


if __name__ == "__main__":
    print(json.dumps(snapshot(sys.argv[1])))
