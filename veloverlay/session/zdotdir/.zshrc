# veloverlay enter: the user's interactive start-up first, then the session's prompt marker.
if [[ -n "$VELO_USER_ZDOTDIR" ]]; then
    export ZDOTDIR=$VELO_USER_ZDOTDIR
else
    unset ZDOTDIR  # zsh's default: $HOME, as for any zsh started in the session
fi
unset VELO_USER_ZDOTDIR
if [[ -f "${ZDOTDIR:-$HOME}/.zshrc" ]]; then
    source "${ZDOTDIR:-$HOME}/.zshrc"
fi
__velo_prompt() {
    [[ "$PS1" == "(velo:${VELO_SESSION_REF//\%/%%}) "* ]] || PS1="(velo:${VELO_SESSION_REF//\%/%%}) $PS1"
}
__velo_prompt
# A prompt rebuilt before each command (a precmd hook, as themes do) keeps the marker too.
autoload -Uz add-zsh-hook && add-zsh-hook precmd __velo_prompt
