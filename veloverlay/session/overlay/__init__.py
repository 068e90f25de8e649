"""The overlay backend: the view is an overlay mount in the session's own namespaces (backend.py,
pid1.py); its changes are read from the upper directory (harvest.py).

May import: the session core, lower, store, the leaves and the kernel facilities; never the shim
backend.
"""
