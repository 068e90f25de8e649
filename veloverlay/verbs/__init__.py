"""Verbs that join stages: the library's face for the CLI (repo.py), garbage collection over
refs, sessions and cached layers (gc.py), and fsck of objects, manifests and layers (fsck.py).

May import: everything below the CLI (session, lower, ingest, store, facilities, leaves).
Never imports cli.
"""
