# veloverlay enter: zsh starts with ZDOTDIR here; the user's own .zshenv is read as usual.
__velo_zdotdir=$ZDOTDIR
ZDOTDIR=${VELO_USER_ZDOTDIR:-$HOME}
if [[ -f "$ZDOTDIR/.zshenv" ]]; then
    source "$ZDOTDIR/.zshenv"
fi
VELO_USER_ZDOTDIR=$ZDOTDIR  # the user's .zshenv may point it elsewhere: .zshrc is read there
ZDOTDIR=$__velo_zdotdir     # zsh reads our .zshrc next, which restores the user's
unset __velo_zdotdir
