"""Real programs under the shim change files and the committed manifest follows; a static binary
runs unshimmed, is flagged, and its write is still caught by the end-of-session stat-diff."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import checkout_ref, fsck_ok, new_store
from tests.shim._util import PY, run_shim

HELLO_C = b'#include <stdio.h>\nint main(void) { puts("built in the tree"); return 0; }\n'
STATIC_C = b"""#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 1;
    write(fd, "static\\n", 7);
    return close(fd);
}
"""


@pytest.fixture(scope="module")
def static_writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("static")
    (d / "w.c").write_bytes(STATIC_C)
    exe = Path("/dev/shm") / f"velo-static-writer-{os.getpid()}"
    subprocess.run(["gcc", "-static", "-O1", "-o", exe, d / "w.c"], check=True)
    os.chmod(exe, 0o755)  # on /dev/shm: the unprivileged uid must be able to run it
    yield exe
    exe.unlink()


def test_real_programs(static_writer: Path) -> None:
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        proj = os.path.join(base, "proj")
        script = f"""
cd {proj}
echo first > shell.txt
echo second >> shell.txt
printf 'alpha\\nbeta\\n' > sed.txt
sed -i s/beta/gamma/ sed.txt
{PY} -c "open('py.txt', 'w').write('from python')"
cp f1 f1.copy
mv f2 f2.moved
cat > hello.c <<'END'
{HELLO_C.decode()}END
gcc -o hello hello.c
./hello > hello.out
mkdir repo && cd repo && git init -q && echo tracked > t.txt && git add t.txt
git -c user.name=velo -c user.email=velo@example.invalid commit -qm one
cd ..
{static_writer} static.txt
sh -c "exec {static_writer} static2.txt"
"""
        res = run_shim(store, "t", ["sh", "-euc", script], link=False, at=proj)
        assert res.exit_status == 0, res
        got = os.path.join(base, "got")
        checkout_ref(store, "t", got)

        def read(rel: str) -> bytes:
            with open(os.path.join(got, rel), "rb") as f:
                return f.read()

        assert read("shell.txt") == b"first\nsecond\n"
        assert read("sed.txt") == b"alpha\ngamma\n"
        assert read("py.txt") == b"from python"
        assert read("f1.copy") == read("f1") == b"one\n"
        assert read("f2.moved") == b"two\n" and not os.path.exists(os.path.join(got, "f2"))
        assert read("hello.out") == b"built in the tree\n"
        assert os.stat(os.path.join(got, "hello")).st_mode & 0o111
        log = subprocess.run(
            ["git", "-C", os.path.join(got, "repo"), "log", "--format=%s"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert log.stdout.strip() == "one"
        # the static binary ran without the shim: flagged, and its write still committed
        assert read("static.txt") == read("static2.txt") == b"static\n"
        flagged = [w for w in res.warnings if "without the shim" in w]
        assert flagged and flagged[0].count(str(static_writer)) == 2, res.warnings
        assert "git" not in flagged[0] and "gcc" not in flagged[0]
        assert not fsck_ok(store)
