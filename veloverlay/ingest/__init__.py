"""Trees in: walk a source directory, read each file stably under a shared lock, stage and
publish its bytes, build the nodes and commit them as a version of a ref (pipeline.py).

May import: store, the leaves and the kernel facilities. Never imports lower, session, verbs
or cli.
"""

from veloverlay.ingest.pipeline import IngestResult, drop_cache, ingest

__all__ = ["IngestResult", "drop_cache", "ingest"]
