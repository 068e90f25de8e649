"""The prompt of an interactive session (`enter`): a marker that names the ref, whatever the shell.

Shells read the user's start-up files, which usually set the prompt and would drop a marker
given in the environment; each is started so that the user's files come first and the marker is
put in front of the prompt they made (and kept when a theme rebuilds it before each command):
- bash: `--rcfile session.bashrc` (beside this module), which reads ~/.bashrc first;
- zsh: `ZDOTDIR` set to `zdotdir/`, whose .zshenv and .zshrc read the user's own (from their
  ZDOTDIR or $HOME) and then restore it, so zsh started inside the session is the user's;
- fish: `--init-command` sources `session.fish` after config.fish, wrapping `fish_prompt`.
Other shells get PS1 in the environment, in the plain form every POSIX shell shows as it is
(`sh` prints bash's `\\w` literally).
"""

from __future__ import annotations

import os

__all__ = ["shell_argv", "environment", "RCFILE"]

_HERE = os.path.dirname(os.path.abspath(__file__))
RCFILE = os.path.join(_HERE, "session.bashrc")
ZDOTDIR = os.path.join(_HERE, "zdotdir")
FISHFILE = os.path.join(_HERE, "session.fish")


def shell_argv(shell: str) -> list[str]:
    """How to start `shell` interactively with the session's prompt marker."""
    name = os.path.basename(shell)
    if name == "bash":
        return [shell, "--rcfile", RCFILE, "-i"]
    if name == "zsh":  # ZDOTDIR for zsh alone, through env(1): nothing else in the session sees it
        user = os.environ.get("ZDOTDIR", "")
        return ["/usr/bin/env", f"VELO_USER_ZDOTDIR={user}", f"ZDOTDIR={ZDOTDIR}", shell, "-i"]
    if name == "fish":
        return [shell, "-i", "--init-command", f"source {_fish_quote(FISHFILE)}"]
    return [shell, "-i"]


def _fish_quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def environment(env: dict[str, str], ref: str) -> None:
    """The marker for shells that read PS1 from the environment (bash, zsh and fish: above)."""
    env["VELO_SESSION_REF"] = ref
    env["PS1"] = f"(velo:{ref}) $ "
