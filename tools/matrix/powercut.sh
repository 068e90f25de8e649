# The power-cut guest (sourced by guest-init.sh when MODE=powercut). The host kills qemu with
# SIGKILL at seeded random moments of the work phase; each boot first checks what the previous
# kill left, then works until it is killed again. The store and the tree live on /dev/vdc
# (qemu cache=none: what the guest had not flushed is gone, as in a power cut).
#   check: fsck --json (re-hashes every object, resolves every manifest reference); every ref
#          listed recursively; an independent scan that no object file is empty unless it is the
#          empty blob; then sessions left by the kill are harvested and fsck runs again.
#   work:  loop { change PC_CHANGE files of the tree; ingest it as `big`; a writing session on
#          `work` (a 200-file directory of the tree) } until killed.
# Settings: PC_FILES (tree size), PC_CHANGE, PC_SEED. /proc/cmdline "velo.final" = check only.
DATA=/data
STORE=$DATA/store
V="veloverlay --store $STORE"
mkdir -p $DATA
if ! mount -o rw /dev/vdc $DATA; then
  say "PC-ERROR cannot mount /dev/vdc"
  off
fi
BOOTNO=$(($(cat $DATA/bootno 2>/dev/null || echo 0) + 1))
echo $BOOTNO >$DATA/bootno
sync

pc_check() {
  t0=$(now)
  $V fsck --json >/tmp/fsck1.json 2>/tmp/fsck1.err
  fsck1=$?
  $V refs --json >/tmp/refs.json 2>/tmp/refs.err
  refs_rc=$?
  $V sessions --json >/tmp/sessions.json 2>/tmp/sessions.err
  $V harvest --all >/tmp/harvest.out 2>&1
  harvest_rc=$?
  $V fsck --json >/tmp/fsck2.json 2>/tmp/fsck2.err
  fsck2=$?
  python3 - "$STORE" "$fsck1" "$fsck2" "$refs_rc" "$harvest_rc" "$t0" "$BOOTNO" <<'EOF'
import json, os, subprocess, sys, time
from blake3 import blake3

store, fsck1, fsck2, refs_rc, harvest_rc, t0, bootno = sys.argv[1:]
out = {"boot": int(bootno), "fsck_rc": int(fsck1), "fsck_after_harvest_rc": int(fsck2),
       "refs_rc": int(refs_rc), "harvest_rc": int(harvest_rc)}

def load(path):
    try:
        return json.load(open(path))
    except Exception as exc:  # noqa: BLE001
        return {"unreadable": f"{exc}: {open(path.replace('.json', '.err')).read()[-300:]}"}

out["fsck"] = load("/tmp/fsck1.json")
out["fsck_after_harvest"] = load("/tmp/fsck2.json")
refs = load("/tmp/refs.json")
out["sessions"] = load("/tmp/sessions.json")
# Every ref a complete manifest: list it recursively (every node must load).
names = [r["name"] for r in refs] if isinstance(refs, list) else [
    r["name"] for r in refs.get("refs", [])] if isinstance(refs, dict) and "refs" in refs else []
out["refs"] = {}
for name in names:
    p = subprocess.run(["veloverlay", "--store", store, "ls", "-r", name],
                       capture_output=True, text=True)
    if p.returncode != 0:
        p = subprocess.run(["veloverlay", "--store", store, "checkout", name,
                            f"/dev/shm/co-{name}"], capture_output=True, text=True)
        subprocess.run(["rm", "-rf", f"/dev/shm/co-{name}"])
    out["refs"][name] = {"rc": p.returncode, "entries": len(p.stdout.splitlines()),
                         "err": p.stderr[-300:]}
# No object with a valid name and torn or empty content: fsck re-hashes every object against
# its name (above, twice); here only the cheap part is repeated independently: no object file
# is empty unless its name is the digest of no bytes.
# Both fan-outs: objects-v2/ab/<hex> (new stores), objects-v1/ab/cd/<hex> (older ones).
empty_name = blake3(b"").hexdigest()
scanned = bad = 0
bad_names = []
for root, _dirs, files in (w for d in ("objects-v2", "objects-v1")
                           for w in os.walk(os.path.join(store, d))):
    for f in files:
        if len(f) != 64:
            continue
        scanned += 1
        if os.stat(os.path.join(root, f)).st_size == 0 and f != empty_name:
            bad += 1
            bad_names.append(f)
out["objects_scanned"] = scanned
out["objects_bad"] = bad
out["objects_bad_names"] = bad_names[:10]
out["check_seconds"] = round(float(open("/proc/uptime").read().split()[0]) - float(t0), 1)
print("VELO-PC-CHECK " + json.dumps(out, separators=(",", ":")), flush=True)
EOF
}

pc_prep() {
  say "PC-PREP files=$PC_FILES"
  python3 - "$DATA/tree" "$PC_FILES" "$PC_SEED" <<'EOF'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02d}", f"s{(i // 100) % 20:02d}")
    os.makedirs(d, exist_ok=True)
    size = rnd.choice((0, 1, 37, 512, 1500, 4096, 9000, 70000))
    with open(os.path.join(d, f"f{i:06d}.dat"), "wb") as f:
        f.write(rnd.randbytes(size))
EOF
  $V init >/dev/null
  sync
  say "PC-PREP-DONE uptime=$(now)"
}

pc_work() {
  say "PC-WORK-START boot=$BOOTNO uptime=$(now)"
  cycle=0
  while :; do
    cycle=$((cycle + 1))
    c0=$(now)
    python3 - "$DATA/tree" "$PC_CHANGE" "$PC_SEED" "$BOOTNO" "$cycle" <<'EOF'
import os, random, sys
root, n, seed, boot, cycle = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
rnd = random.Random(seed * 1_000_003 + boot * 1009 + cycle)
files = [os.path.join(r, f) for r, _d, fs in os.walk(root) for f in fs]
for path in rnd.sample(files, min(n, len(files))):
    with open(path, "wb") as f:
        f.write(rnd.randbytes(rnd.choice((0, 100, 5000, 60000))))
EOF
    say "PC-PHASE ingest boot=$BOOTNO cycle=$cycle uptime=$(now)"
    $V ingest $DATA/tree --name big -j 2 >/dev/null 2>/tmp/ingest.err || {
      say "PC-INGEST-FAILED $(tail -2 /tmp/ingest.err | tr '\n' ' ')"
    }
    say "PC-PHASE session boot=$BOOTNO cycle=$cycle uptime=$(now)"
    [ -e $DATA/work-ingested ] || {
      $V ingest $DATA/tree/d00 --name work -j 2 >/dev/null 2>/tmp/ingest.err && touch $DATA/work-ingested
    }
    rm -rf $DATA/proj
    $V run work --at $DATA/proj -m "power-cut session $BOOTNO.$cycle" -- sh -c '
      cd /data/proj || exit 1; i=0; while [ $i -lt 300 ]; do printf "session %s %s\n" "$1" $i > new-$i.txt; i=$((i+1)); done
      for f in s0*/*.dat; do printf "tail %s\n" "$1" >> "$f"; done
      rm -f s11/*.dat; mkdir -p made/by/session; printf x > made/by/session/leaf' \
      sh "$BOOTNO.$cycle" >/dev/null 2>/tmp/session.err || {
      say "PC-SESSION-FAILED $(tail -2 /tmp/session.err | tr '\n' ' ')"
    }
    say "PC-CYCLE-DONE boot=$BOOTNO cycle=$cycle seconds=$(python3 -c "print(round($(now) - $c0, 1))")"
  done
}

if [ -d $STORE ]; then
  pc_check
elif [ -n "${PC_FILES:-}" ]; then
  pc_prep
fi
if grep -qw velo.final /proc/cmdline; then
  off
fi
pc_work
