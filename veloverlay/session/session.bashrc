# veloverlay enter: the user's own interactive start-up first, then the session's prompt marker.
# bash reads this file instead of ~/.bashrc (--rcfile); the system-wide file is read as usual.
if [ -f "$HOME/.bashrc" ]; then
    . "$HOME/.bashrc"
fi
__velo_prompt() {
    case "$PS1" in
        "(velo:$VELO_SESSION_REF) "*) ;;
        *) PS1="(velo:$VELO_SESSION_REF) $PS1" ;;
    esac
}
__velo_prompt
# A prompt rebuilt before each command (PROMPT_COMMAND, as some themes do) keeps the marker too.
# Joined by a newline, not ';': a PROMPT_COMMAND that ends in ';' or '&' (pyenv-virtualenv's
# '_pyenv_virtualenv_hook;') would otherwise become a syntax error at every prompt.
PROMPT_COMMAND="${PROMPT_COMMAND:+$PROMPT_COMMAND
}__velo_prompt"
