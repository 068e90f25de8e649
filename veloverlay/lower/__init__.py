"""Trees out as overlay lower layers: metadata layers (data-only form) or proxy-link trees,
cached per root in the store or the per-boot cache (homes.py), built whole or as a delta over a
cached base (layers.py, stacks.py), with their objects named and protected (objects.py), and
evicted by gc (prune.py).

May import: store, the leaves and the kernel facilities. Never commits (no ref or commit is
written here), never imports ingest, session, verbs or cli.
"""
