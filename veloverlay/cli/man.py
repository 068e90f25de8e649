"""`veloverlay --help-man`: the manual page (roff), generated from the same typer definitions
as `--help`, so the two cannot disagree. View it with `veloverlay --help-man | man -l -`."""

import time
from typing import Any

from veloverlay import __version__, envvars

__all__ = ["man_page"]


def _esc(text: str) -> str:
    """Roff-safe text: backslashes, and a leading dot or quote would start a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        ("\\&" + line if line[:1] in (".", "'") else line) for line in text.split("\n")
    )


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in (text or "").strip().split("\n\n"):
        out += [".PP", _esc(" ".join(line.strip() for line in para.splitlines()))]
    return out


def _params(cmd: Any, ctx: Any) -> list[str]:
    out = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, text = record
        out += [".TP", f"\\fB{_esc(names)}\\fR", _esc(text)]
    return out


def _commands(group: Any, ctx: Any, prefix: str) -> list[str]:
    out: list[str] = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        out += [".SS", f"\\fB{_esc(prefix + ' ' + name)}\\fR {_esc(usage)}"]
        out += _paragraphs(cmd.help or "")
        if getattr(cmd, "commands", None):
            out += _commands(cmd, sub, f"{prefix} {name}")
        else:
            out += _params(cmd, sub)
    return out


def man_page(root: Any, ctx: Any) -> str:
    summary = (root.help or "").split(". ", 1)[0].rstrip(".")
    date = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [
        f'.TH VELOVERLAY 1 "{date}" "veloverlay {__version__}" "User Commands"',
        ".SH NAME",
        f"veloverlay \\- {_esc(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        "\\fBveloverlay\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *_paragraphs(root.help or ""),
        ".PP",
        "The options \\fB\\-\\-store\\fR, \\fB\\-\\-debug\\fR and \\fB\\-\\-json\\fR may be given "
        "before or after the command.",
        ".SH OPTIONS",
        *_params(root, ctx),
        ".SH COMMANDS",
        *_commands(root, ctx, "veloverlay"),
        ".SH ENVIRONMENT",
    ]
    for name, text in envvars.VARS.items():
        if not name.startswith(("VELO_TEST", "VELO_INTERNAL")):
            lines += [".TP", f"\\fB{_esc(name)}\\fR", _esc(text)]
    lines += [
        ".SH EXIT STATUS",
        ".TP\n0\nsuccess",
        ".TP\n1\nfailure: \\fBerror:\\fR and \\fBhint:\\fR lines on stderr "
        "(with \\fB\\-\\-json\\fR also a JSON object on stdout carrying the reason)",
        ".TP\n2\nusage error",
        ".TP\n129\nthe terminal was closed (SIGHUP), after the clean-up Ctrl-C does",
        ".TP\n130\ninterrupted (Ctrl-C)",
        ".TP\n141\nstdout was closed early (a pipe to \\fBhead\\fR)",
        ".TP\n143\nterminated (SIGTERM), after the clean-up Ctrl-C does",
        ".PP\n\\fBrun\\fR and \\fBenter\\fR exit with the status of their command "
        "(127: not found); SIGTERM and SIGHUP sent to them are passed on to the command, "
        "which gets \\fB\\-\\-grace\\fR seconds before SIGKILL (143 for a command SIGTERM "
        "ended, as in a shell).",
    ]
    return "\n".join(lines) + "\n"
