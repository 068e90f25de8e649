"""Real-shaped trees for tests: modes as real trees have them, and a real git repository.

`make_project(root)` makes a small C project under git (made with `git init` and two commits, so
`.git/objects` holds 0444 files, as every git repository does) with the modes found in real trees:
0444 and 0600/0700/0755 files, a 0555 directory and a setgid directory. Callers that run as the
root-free test uid call it as that uid (the files must be theirs).
"""

from __future__ import annotations

import os
import stat
import subprocess

__all__ = ["make_project", "git", "REAL_MODES", "modes_of"]

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}

# path -> mode of the non-git part of the project (the git objects add their own 0444 files)
REAL_MODES = {
    "src": 0o755,
    "src/main.c": 0o644,
    "src/version.h": 0o444,
    "secrets.env": 0o600,
    "build.sh": 0o755,
    "private": 0o700,
    "private/notes": 0o600,
    "private/run": 0o700,
    "vendor": 0o555,
    "vendor/lib.h": 0o444,
    "shared": 0o2775,
    "shared/data": 0o664,
}


def git(cwd: str, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV, "HOME": cwd}
    p = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def make_project(root: str) -> None:
    os.makedirs(os.path.join(root, "src"))
    files = {
        "src/main.c": b'#include "version.h"\nint main(void) { return 0; }\n',
        "src/version.h": b"#define VERSION 1\n",
        "secrets.env": b"TOKEN=x\n",
        "build.sh": b"#!/bin/sh\ncc -o app src/main.c\n",
        "README": b"a small C project\n",
    }
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    with open(os.path.join(root, "README"), "ab") as f:
        f.write(b"more\n")
    git(root, "commit", "-qam", "second")
    for d in ("private", "vendor", "shared"):
        os.mkdir(os.path.join(root, d))
    for rel, data in {
        "private/notes": b"n\n",
        "private/run": b"#!/bin/sh\n",
        "vendor/lib.h": b"/* lib */\n",
        "shared/data": b"d\n",
    }.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    # files first, then their directories (a 0555 directory takes no new entries)
    for rel, mode in sorted(REAL_MODES.items(), key=lambda kv: -kv[0].count("/")):
        os.chmod(os.path.join(root, rel), mode)


def modes_of(root: str) -> dict[str, int]:
    """path -> permission bits (with setgid) of every file and directory under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(p, root)] = stat.S_IMODE(st.st_mode)
    return out
