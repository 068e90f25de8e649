#!/bin/sh
# The matrix guest's init (pid 1), run by the image's /velo-init.sh from the job disk (/job).
#
# /job/job.env says what to do (written by tools/matrix/run.py):
#   BOX, MODE (suite | powercut | bench), SYSCTLS ("key=value ..."), NO_OVERLAY (0/1),
#   VERITY_DISK (0/1: /dev/vdc is an ext4 with fs-verity, mounted on /tmp for the suite's stores),
#   SUITE (pytest arguments), MUST_ROOT / MUST_USER (VELO_TEST_MUST_WORK per identity),
#   TEST_TIMEOUT (per-test seconds), PC_* (power-cut settings), BENCH (bench mode's arguments).
# Results go to /job/results (read by the host with debugfs once the guest is off) and the
# progress to the serial console as "VELO-..." lines. Ends with a sysrq power-off.
PATH=/opt/velo/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
exec >/dev/console 2>&1
. /job/job.env
R=/job/results
mkdir -p $R
SRC=/opt/velo/src
VUSER=velo
VUID=1500

now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "VELO-$*"; }
off() {
  say "POWEROFF uptime=$(now)"
  sync
  umount /job 2>/dev/null
  sync
  echo o >/proc/sysrq-trigger
  while :; do :; done # the power-off is asynchronous; pid 1 must not exit meanwhile
}
step() { # step NAME: record the guest uptime at each step boundary
  echo "$1 $(now)" >>$R/steps.txt
  say "STEP $1 uptime=$(now)"
}
as_user() { setpriv --reuid=$VUID --regid=$VUID --init-groups env HOME=/home/$VUSER USER=$VUSER "$@"; }

# --- the machine ---------------------------------------------------------------------------
say "GUEST-UP box=$BOX kernel=$(uname -r) uptime=$(now)"
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777,size=768m tmpfs /dev/shm
mkdir -p /dev/pts && mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mountpoint -q /run || mount -t tmpfs -o mode=755 tmpfs /run
mount -o remount,rw / 2>/dev/null
mkdir -p /tmp && rm -rf /tmp/* 2>/dev/null
if [ "${VERITY_DISK:-0}" = 1 ]; then
  if ! mount -t ext4 /dev/vdc /tmp; then
    say "ERROR cannot mount the verity disk"
    echo "cannot mount the verity disk /dev/vdc" >$R/error.txt
    off
  fi
  # The suite's stores go there too (tests/helpers: VELO_INTERNAL__TEST_SCRATCH), not /dev/shm.
  export VELO_INTERNAL__TEST_SCRATCH=/tmp
  say "VERITY-DISK $(grep ' /tmp ' /proc/mounts)"
fi
chmod 1777 /tmp
hostname "velo-$BOX" 2>/dev/null
# The loopback interface, for tests that serve on 127.0.0.1 (the image has no iproute2: without
# this, connecting there is ENETUNREACH): SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP.
ip link set lo up 2>/dev/null || python3 -c '
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
f = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, struct.pack("16sH14s", b"lo", 0, b"")))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", f | 1, b""))
' || echo "warning: the loopback interface is down" >&2
step boot

for kv in $SYSCTLS; do
  key=${kv%%=*}
  val=${kv#*=}
  echo "$val" >/proc/sys/$(echo "$key" | tr . /) && say "SYSCTL $key=$(cat /proc/sys/$(echo "$key" | tr . /))"
done
if [ "${NO_OVERLAY:-0}" = 1 ]; then
  # Remove the module for real (a blacklist alone still lets a mount autoload it) and forbid
  # any later load; then prove the kernel has no overlay filesystem.
  rmmod overlay 2>/dev/null
  find /lib/modules/$(uname -r) -name 'overlay.ko*' -delete
  echo "install overlay /bin/false" >/etc/modprobe.d/velo-no-overlay.conf
  depmod -a
  if grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null; then
    say "ERROR overlay still available"
    echo "overlay still available" >$R/error.txt
    off
  fi
  say "NO-OVERLAY ok"
fi
{
  echo "kernel=$(uname -r)"
  echo "debian=$(cat /etc/debian_version)"
  echo "python=$(/opt/velo/venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
} >$R/guest.txt

# --- the project, installed offline ----------------------------------------------------------
if [ "$MODE" = powercut ] && [ -e $SRC/.velo-installed ]; then
  : # a later boot of the same power-cut campaign: the root disk keeps the install
else
  rm -rf $SRC && cp -a /job/src $SRC
fi
cd $SRC
if [ -e $SRC/.velo-installed ]; then
  :
elif ! pip install -q --no-index --find-links /opt/velo/wheels --no-build-isolation --no-deps \
  -e . >$R/pip.log 2>&1; then
  say "ERROR pip install failed"
  tail -20 $R/pip.log
  echo "pip install failed" >$R/error.txt
  off
fi
# Bytecode once, now: PYTHONDONTWRITEBYTECODE keeps runs from writing into the tree, and without
# it every fresh interpreter (the shim daemon, CLI calls) recompiles under emulation (~0.5 s).
python -m compileall -q -j0 $SRC/veloverlay $SRC/tests >>$R/pip.log 2>&1
chown -R $VUID:$VUID $SRC
touch $SRC/.velo-installed
sync
step install

if [ "$MODE" = powercut ]; then
  . /job/powercut.sh # never returns
fi
droot= duser=
if [ "${VERITY_DISK:-0}" = 1 ]; then # doctor answers for stores on the verity disk
  veloverlay --store /tmp/doctor-root init >/dev/null 2>&1
  as_user veloverlay --store /tmp/doctor-user init >/dev/null 2>&1
  droot="--store /tmp/doctor-root" duser="--store /tmp/doctor-user"
fi
veloverlay $droot doctor --json >$R/doctor-root.json 2>$R/doctor-root.err
as_user veloverlay $duser doctor --json >$R/doctor-user.json 2>$R/doctor-user.err
step doctor
for who in root user; do
  say "DOCTOR $who $(python3 -c "import json,sys; c=json.load(open('$R/doctor-$who.json'))['chosen']; print(c['backend'], c['lower_form'])" 2>&1)"
done

# --- the suite -----------------------------------------------------------------------------
suite() { # suite WHO MUST: pytest as root or as the unprivileged user; junit + log + status
  who=$1
  must=$2
  out=/tmp/velo-results-$who
  rm -rf $out && mkdir -p $out && chmod 777 $out
  # VELO_TEST_TIME_SCALE: promised latencies ×5 under TCG (tests/helpers/timing.py says why).
  set -- env VELO_TEST_MUST_WORK="$must" HYPOTHESIS_STORAGE_DIRECTORY=$out/hypothesis \
    VELO_TEST_TIME_SCALE=5 \
    python -m pytest -q -ra -p no:cacheprovider --continue-on-collection-errors \
    --timeout="${TEST_TIMEOUT:-300}" \
    --junitxml=$out/junit.xml $SUITE
  if [ "$who" = user ]; then
    as_user "$@" >$out/pytest.log 2>&1
  else
    "$@" >$out/pytest.log 2>&1
  fi
  echo $? >$R/rc-$who
  cp $out/junit.xml $R/junit-$who.xml 2>/dev/null
  cp $out/pytest.log $R/pytest-$who.log
  say "SUITE $who rc=$(cat $R/rc-$who) $(tail -1 $out/pytest.log)"
}

case "$MODE" in
suite)
  suite root "$MUST_ROOT"
  step suite-root
  suite user "$MUST_USER"
  step suite-user
  ;;
bench)
  # BENCH: a benchmark and its arguments, as root (e.g. bench/bench_verity.py --base /tmp)
  modprobe loop 2>/dev/null # loop mounts (Debian builds it as a module)
  python $BENCH >$R/bench.log 2>&1
  echo $? >$R/rc-bench
  cp bench/results/*.json $R/ 2>/dev/null
  say "BENCH rc=$(cat $R/rc-bench) $(tail -1 $R/bench.log)"
  step bench
  ;;
esac
off
