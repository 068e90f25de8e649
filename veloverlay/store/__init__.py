"""What is stored: objects by BLAKE3 (cas), Merkle directory nodes (tree), manifests, refs and
commits in LMDB (manifest), merges and stacks of trees, checkout, bundles.

May import: the leaves (errors, paths, records, files, faults, envvars, _libc) and the kernel
facilities (fsflags, linking, tiers, workers). Knows nothing of projection: never imports lower,
ingest, session, verbs, remote or cli. Only store/manifest imports lmdb; only store/digest
imports blake3.
"""
