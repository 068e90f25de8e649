"""The prompt of an interactive session (`enter`): a marker that names the ref, whatever the shell.

bash reads the user's ~/.bashrc, which usually sets PS1 and would drop a marker given in the
environment: bash is started with `--rcfile` naming `session.bashrc` (beside this module), which
reads the user's start-up files first and puts the marker in front of the prompt they made.
Other shells get PS1 in the environment, in the plain form every POSIX shell shows as it is
(`sh` prints bash's `\\w` literally).
"""

from __future__ import annotations

import os

__all__ = ["shell_argv", "environment", "RCFILE"]

RCFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "session.bashrc")


def shell_argv(shell: str) -> list[str]:
    """How to start `shell` interactively with the session's prompt marker."""
    if os.path.basename(shell) == "bash":
        return [shell, "--rcfile", RCFILE, "-i"]
    return [shell, "-i"]


def environment(env: dict[str, str], ref: str) -> None:
    """The marker for shells that read PS1 from the environment (bash: see `session.bashrc`)."""
    env["VELO_SESSION_REF"] = ref
    env["PS1"] = f"(velo:{ref}) $ "
