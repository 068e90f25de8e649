# veloverlay enter: fish runs this after the user's config (fish --init-command), so the marker
# goes in front of whatever prompt the user's config.fish or theme defined.
if functions -q fish_prompt
    functions -c fish_prompt __velo_user_prompt
else
    function __velo_user_prompt
        echo -n '> '
    end
end
function fish_prompt
    printf '(velo:%s) ' $VELO_SESSION_REF
    __velo_user_prompt
end
