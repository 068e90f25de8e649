"""Sessions: one core (options, state, select, target, reaper, harvest, commit) and two backends
that supply only how the view is made and how its changes are read: session/overlay/ (an overlay
mount in the session's namespaces) and session/shim/ (a materialised tree watched by the
LD_PRELOAD shim and its daemon).

May import: lower, store, the leaves and the kernel facilities. The two backends never import
each other; nothing here imports verbs or cli.
"""

from veloverlay.session.core import (
    choose_backend,
    clean_sessions,
    enter,
    harvest_resume,
    list_sessions,
    mount,
    run,
    umount,
)
from veloverlay.session.options import SessionInfo, SessionOptions, SessionResult

__all__ = [
    "SessionInfo",
    "SessionOptions",
    "SessionResult",
    "choose_backend",
    "clean_sessions",
    "enter",
    "harvest_resume",
    "list_sessions",
    "mount",
    "run",
    "umount",
]
