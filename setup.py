"""Builds the LD_PRELOAD shim as part of every install (pyproject.toml holds the metadata).

`veloverlay._veloshim` is a plain shared object built from shim/*.c: it has no PyInit_ and is
never imported, only preloaded by shim-backend sessions (veloverlay/session/shim/library.py finds
it in the package root). Same flags as shim/Makefile: warnings are errors.
"""

from setuptools import Extension, setup

SOURCES = [
    "shim/init.c",
    "shim/resolve.c",
    "shim/journal.c",
    "shim/fdtab.c",
    "shim/bbw.c",
    "shim/open.c",
    "shim/fd.c",
    "shim/path.c",
    "shim/meta.c",
    "shim/exec.c",
    "shim/sysfile.c",
    "shim/sysc.c",
]

setup(
    ext_modules=[
        Extension(
            "veloverlay._veloshim",
            sources=SOURCES,
            depends=["shim/veloshim.h", "shim/format.h"],
            extra_compile_args=[
                "-std=gnu11",
                "-fvisibility=hidden",
                "-fno-delete-null-pointer-checks",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-nonnull-compare",
                "-U_FORTIFY_SOURCE",
            ],
            libraries=["dl"],
        )
    ],
)
