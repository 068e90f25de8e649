"""The shim backend, for hosts without a usable overlay: the view is a materialised tree
(materialize.py) watched by the LD_PRELOAD library (library.py: the C shim seen from Python), a
live daemon (daemon.py) and the end-of-session stat-diff (treesync.py); procs.py runs them.

May import: the session core, lower, store, the leaves and the kernel facilities; never the
overlay backend.
"""
