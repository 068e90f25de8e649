#!/usr/bin/env bash
# The built-in example: ingest a small project, project it as a live directory, change it inside
# a session, let the harvester commit the change, and show the result. Uses a throw-away store.
set -euo pipefail
work=$(mktemp -d /tmp/veloverlay-demo.XXXXXX)
# The per-boot layer cache of this throw-away store: on tmpfs where there is one, removed with it.
runtime=$(mktemp -d /dev/shm/veloverlay-demo.XXXXXX 2>/dev/null || mktemp -d "$work/runtime.XXXXXX")
# As root, projected objects carry chattr +i (that is the point): clear it to delete the store.
trap 'chattr -R -i "$work/store" 2>/dev/null || true; rm -rf "$work" "$runtime"' EXIT
export VELO_STORE="$work/store" VELO_RUNTIME_DIR="$runtime"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

mkdir -p "$work/project/src" "$work/project/empty"
printf 'print("hello from v1")\n' > "$work/project/src/app.py"
printf 'demo project\n' > "$work/project/README"
printf 'remove me\n' > "$work/project/obsolete.txt"
ln -s src/app.py "$work/project/main.py"

say veloverlay ingest project --name demo
veloverlay ingest "$work/project" --name demo
say veloverlay doctor
veloverlay doctor | tail -5
say "veloverlay run demo --at $work/live -- sh -c '...change things...'"
cd "$work"  # a session keeps the caller's directory; the projection appears at --at
veloverlay run demo --at "$work/live" -m "demo change" -- sh -c '
  set -e
  cd live; echo "inside: $(pwd)"; ls -l
  sed -i "s/v1/v2/" src/app.py
  echo "new file" > src/added.txt
  rm obsolete.txt
  chmod 0600 README
'
say "ls -A $work/live   # the session made it and took it along: nothing stays outside"
ls -A "$work/live" 2>&1 || true
say veloverlay log demo
veloverlay log demo
say veloverlay diff 'demo@{1}' demo
veloverlay diff 'demo@{1}' demo
say veloverlay cat demo src/app.py
veloverlay cat demo src/app.py
say veloverlay run demo --at "$work/live" -- python3 live/main.py
veloverlay run demo --at "$work/live" -- python3 live/main.py
say veloverlay fsck
veloverlay fsck
