"""The command line of issue 15: versions by commit id and tag, refs that keep their source,
what deleting a ref frees, disk use in status, removing a store. Real processes, real trees."""

from __future__ import annotations

import hashlib
import os
import re

from tests.e2e.test_cli import data, failed, ok, velo
from tests.envs.realtree import make_project
from tests.helpers.trees import assert_same_tree


def test_versions_tags_and_ref_sources_on_the_command_line(shm_tmp: str) -> None:
    store = os.path.join(shm_tmp, "store")
    a, b = os.path.join(shm_tmp, "work", "app"), os.path.join(shm_tmp, "docs", "app")
    make_project(a)
    os.makedirs(b)
    with open(os.path.join(b, "README"), "w") as f:
        f.write("notes\n")
    ok(velo(store, "ingest", a))
    err = failed(velo(store, "ingest", b, "--debug"), "other-source")
    assert f"ingested from {a}" in err and "--moved" in err
    out = ok(velo(store, "ingest", b, "--force"))
    assert f"its path is now {b} (was {a})" in out
    log = data(velo(store, "log", "app", "--json"))
    old = log[1]["id"][:8]
    dest = os.path.join(shm_tmp, "old")
    ok(velo(store, "checkout", old, dest))  # a commit id prefix names the version
    assert_same_tree(a, dest)
    out = ok(velo(store, "rollback", "app", old))
    assert f"path {a}" in out
    refs = data(velo(store, "refs", "--json"))
    assert [(r["name"], r["path"]) for r in refs] == [("app", a)]
    ok(velo(store, "tag", "first", old))
    tags = data(velo(store, "tag", "--json"))
    assert [(t["name"], t["commit"][:8]) for t in tags] == [("first", old)]
    status = ok(velo(store, "status"))
    assert re.search(r"^disk: .* in the store \(objects ", status, re.M), status
    disk = data(velo(store, "status", "--json"))["disk"]
    contents = set()  # distinct file contents of both trees: one object each
    for top in (a, b):
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    contents.add(hashlib.sha256(f.read()).digest())
    assert disk["objects"]["files"] == len(contents)
    out = ok(velo(store, "refs", "--delete", "app"))
    assert "deleted ref app" in out and "gc --grace 0" in out
    assert "only it used are freed by a 'veloverlay gc' from" in out
    dest2 = os.path.join(shm_tmp, "tagged")
    ok(velo(store, "checkout", "first", dest2))  # the tag outlives its ref
    assert_same_tree(a, dest2)
    failed(velo(store, "remove-store", "--debug"), "usage", code=2)
    assert os.path.isdir(store)
    ok(velo(store, "remove-store", "--yes"))
    assert not os.path.lexists(store)
