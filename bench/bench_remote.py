"""Push and pull through a local registry against `skopeo copy` of the same tree as one tar layer,
and against `ostree pull` of the same tree over local HTTP, in one run; then the incremental case
(10 files changed). Two trees: 20,000 files of 4 KiB, and a real venv (this checkout's .venv by
default, `--venv DIR`).

Each repetition starts a fresh `docker-registry` on 127.0.0.1 (plain HTTP, no auth, its own empty
storage: nobody can mount or skip a blob from an earlier repetition). Timed, as whole commands
(interpreter start-up included):
- `veloverlay push REF REMOTE` from a store that holds the tree; `veloverlay pull REMOTE` into a
  fresh store (objects written and published, the ref committed);
- `skopeo copy oci:LAYOUT docker://…` of an OCI image whose one layer is the tree as a tar (gzip -1,
  made before timing: a registry push of an uncompressed layer would make skopeo compress it), and
  `skopeo copy docker://… dir:OUT` back (download only), and that followed by `tar -xzf` of the
  layer (a usable tree, as a pull gives one); `veloverlay ingest` of the tree into a fresh store
  (no network: what storing 20,000 objects costs on this disk) for context;
- `ostree pull` of the same tree committed to an archive repo served by `python3 -m http.server`
  (pull only: ostree has no push over HTTP).
The package's modules are byte-compiled first (as an installed package's are): with
PYTHONDONTWRITEBYTECODE set and an editable install, every command would otherwise compile ~200
modules from source (0.1-0.15 s each time, measured), which no user of an installed package pays.
Incremental: 10 files rewritten, re-ingested (not timed), pushed and pulled into the store that
holds the first version; the peers re-copy the new tar (which cannot share bytes with the old) and
ostree pulls the new commit. Medians of --repeat runs. Prints a table, writes
bench/results/remote.json.

Everything lives on a fresh loop-mounted ext4 under --base when run as root (as bench_ingest's
trees do; `--no-loop` for --base itself): a host's own filesystem can cost far more per file
created than a fresh ext4 (the root ext4 of one machine of this kind: 550 us of system time per
4 KiB file created, against 25 us on a loop ext4 on it), and that would be measured instead.

Usage: python bench/bench_remote.py [--files N] [--venv DIR] [--repeat N] [--quick] [--no-ostree]
                                    [--base DIR] [--no-loop]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchlib import copy_tree, scratch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def make_tree(root: Path, files: int, size: int = 4096, per_dir: int = 100) -> None:
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"f{i % per_dir:03d}").write_bytes(os.urandom(size))
    old = time.time_ns() - 3_600_000_000_000
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(dirpath, n), ns=(old, old))


def change_files(root: Path, n: int = 10) -> int:
    """Rewrite `n` regular files spread over the tree (4 KiB each); returns the bytes written."""
    files = []
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                files.append(p)
    files.sort()
    total = 0
    for i in range(n):
        data = os.urandom(4096)
        files[(i * len(files)) // n].write_bytes(data)
        total += len(data)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start") from None
            time.sleep(0.05)


@contextmanager
def registry(base: Path) -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="reg-", dir=base))
    port = free_port()
    cfg = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(d / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"},
    }
    (d / "config.yml").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(d / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d)


@contextmanager
def http_server(root: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait()


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {p.stderr.decode()[-2000:]}")
    return time.perf_counter() - t


def velo(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "veloverlay", "--store", str(store), *args]


def oci_layout(tree: Path, out: Path) -> None:
    """An OCI image layout whose single layer is `tree` as a tar (gzip level 1)."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    raw = out / "layer.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(tree, arcname=".")
    diff_id = hashlib.sha256(raw.read_bytes()).hexdigest()
    gz = out / "layer.tar.gz"
    with open(raw, "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    raw.unlink()
    layer = gz.read_bytes()
    ld = hashlib.sha256(layer).hexdigest()
    gz.rename(blobs / ld)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        }
    ).encode()
    cd = hashlib.sha256(config).hexdigest()
    (blobs / cd).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{cd}",
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": f"sha256:{ld}",
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    md = hashlib.sha256(manifest).hexdigest()
    (blobs / md).write_bytes(manifest)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{md}",
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "v"},
                    }
                ],
            }
        )
    )


def skopeo_push(layout: Path, reg: str, repo: str) -> float:
    return timed(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v",
         f"docker://{reg}/{repo}:v"]
    )  # fmt: skip


def skopeo_pull(reg: str, repo: str, out: Path) -> float:
    return timed(
        ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{reg}/{repo}:v", f"dir:{out}"]
    )


def skopeo_pull_extract(reg: str, repo: str, out: Path) -> float:
    """skopeo copy to a dir, then unpack the layer: a usable tree, as a pull gives one."""
    t = skopeo_pull(reg, repo, out)
    layer = max(out.iterdir(), key=lambda p: p.stat().st_size)
    dest = out.with_name(out.name + "-tree")
    dest.mkdir()
    return t + timed(["tar", "-xzf", str(layer), "-C", str(dest)])


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure(base: Path, tree: Path, repeat: int, ostree: bool) -> dict[str, object]:
    """Every operation on `tree` (and its 10-file change), `repeat` times; medians and ratios."""
    t: dict[str, list[float]] = {}

    def rec(key: str, secs: float) -> None:
        t.setdefault(key, []).append(secs)

    src_store = base / "src-store"
    subprocess.run(velo(src_store, "init"), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        velo(src_store, "ingest", str(tree), "--name", "t"), check=True, stdout=subprocess.DEVNULL
    )
    layout1 = base / "oci1"
    oci_layout(tree, layout1)
    ostree_srv = base / "ostree-srv"
    if ostree:
        subprocess.run(["ostree", "init", f"--repo={ostree_srv}", "--mode=archive"], check=True)
        subprocess.run(
            ["ostree", "commit", f"--repo={ostree_srv}", "-b", "main", f"--tree=dir={tree}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    # the second version, prepared now (not timed): 10 files changed
    tree2 = base / "tree2"
    copy_tree(tree, tree2)
    changed = change_files(tree2)
    layout2 = base / "oci2"
    oci_layout(tree2, layout2)
    subprocess.run(
        velo(src_store, "ingest", str(tree2), "--name", "t2"), check=True, stdout=subprocess.DEVNULL
    )
    for i in range(repeat):
        with registry(base) as reg:
            r = f"http://{reg}/bench/velo"
            rec("velo_push", timed(velo(src_store, "push", "t", f"{r}:v")))
            dst = base / f"dst-{i}"
            rec("velo_pull", timed(velo(dst, "pull", f"{r}:v", "--name", "t")))
            rec("velo_push_inc", timed(velo(src_store, "push", "t2", f"{r}:v")))
            rec("velo_pull_inc", timed(velo(dst, "pull", f"{r}:v", "--name", "t")))
            rec("skopeo_push", skopeo_push(layout1, reg, "bench/tar"))
            rec("skopeo_pull", skopeo_pull(reg, "bench/tar", base / f"sk-{i}"))
            rec("skopeo_pull_x", skopeo_pull_extract(reg, "bench/tar", base / f"skx-{i}"))
            rec("velo_ingest", timed(velo(base / f"ing-{i}", "ingest", str(tree), "--name", "t")))
            rec("skopeo_push_inc", skopeo_push(layout2, reg, "bench/tar"))
            rec("skopeo_pull_inc", skopeo_pull(reg, "bench/tar", base / f"sk2-{i}"))
        if ostree:
            client = base / f"ostree-client-{i}"
            subprocess.run(["ostree", "init", f"--repo={client}", "--mode=bare-user"], check=True)
            srv = base / f"ostree-srv-{i}"  # the first version only, for the full pull
            copy_tree(ostree_srv, srv)
            with http_server(srv) as port:
                subprocess.run(
                    ["ostree", "remote", "add", f"--repo={client}", "--no-gpg-verify",
                     "origin", f"http://127.0.0.1:{port}/"],
                    check=True,
                )  # fmt: skip
                pull = ["ostree", "pull", f"--repo={client}", "origin", "main"]
                rec("ostree_pull", timed(pull))
                subprocess.run(
                    ["ostree", "commit", f"--repo={srv}", "-b", "main", f"--tree=dir={tree2}"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                rec("ostree_pull_inc", timed(pull))
    med = {k: median(v) for k, v in t.items()}
    nfiles = nbytes = 0
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                nfiles += 1
                nbytes += p.stat().st_size
    ratios = {
        "pull_vs_skopeo": med["velo_pull"] / med["skopeo_pull"],
        "pull_vs_skopeo_and_untar": med["velo_pull"] / med["skopeo_pull_x"],
        "pull_vs_local_ingest": med["velo_pull"] / med["velo_ingest"],
        "push_vs_skopeo": med["velo_push"] / med["skopeo_push"],
        "inc_push_speedup_vs_skopeo": med["skopeo_push_inc"] / med["velo_push_inc"],
        "inc_pull_speedup_vs_skopeo": med["skopeo_pull_inc"] / med["velo_pull_inc"],
    }
    if "ostree_pull" in med:
        ratios["pull_vs_ostree"] = med["velo_pull"] / med["ostree_pull"]
        ratios["inc_pull_vs_ostree"] = med["velo_pull_inc"] / med["ostree_pull_inc"]
    return {
        "files": nfiles,
        "bytes": nbytes,
        "changed_bytes": changed,
        "repeat": repeat,
        "median_s": med,
        "runs_s": t,
        "ratios": ratios,
    }


def show(name: str, res: dict[str, Any]) -> None:
    med = res["median_s"]
    print(
        f"{name}: {res['files']} files, {res['bytes'] / 1e6:.1f} MB; 10 files changed; "
        f"median of {res['repeat']}"
    )
    print(f"{'operation':<28}{'veloverlay':>12}{'skopeo (tar)':>14}{'ostree':>10}")
    for op, vk, sk, ok in (
        ("full push", "velo_push", "skopeo_push", None),
        ("full pull", "velo_pull", "skopeo_pull", "ostree_pull"),
        ("full pull, peer untars", "velo_pull", "skopeo_pull_x", None),
        ("(local ingest, no network)", "velo_ingest", "skopeo_pull_x", None),
        ("incremental push", "velo_push_inc", "skopeo_push_inc", None),
        ("incremental pull", "velo_pull_inc", "skopeo_pull_inc", "ostree_pull_inc"),
    ):
        o = f"{med[ok]:>9.2f}s" if ok and ok in med else f"{'-':>10}"
        print(f"{op:<28}{med[vk]:>11.2f}s{med[sk]:>13.2f}s{o}")
    for k, v in res["ratios"].items():
        print(f"  {k}: {v:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ostree", action="store_true")
    ap.add_argument(
        "--venv",
        default=str(HERE.parent / ".venv"),
        help="A real tree to measure too [default: this checkout's .venv]; '' for none",
    )
    ap.add_argument(
        "--base", default="/var/tmp", help="Directory for the trees [default: /var/tmp]"
    )
    ap.add_argument(
        "--no-loop",
        action="store_true",
        help="use --base as it is instead of a fresh loop-mounted ext4 (the default as root)",
    )
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = 2000, 1
    for tool in ("docker-registry", "skopeo") + (() if args.no_ostree else ("ostree",)):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed (make setup)", file=sys.stderr)
            return 1
    # what `pip install` does for an installed package; PYTHONDONTWRITEBYTECODE stops the
    # interpreter from doing it on first import, and this checkout is an editable install
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(HERE.parent / "veloverlay")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    out: dict[str, Any] = {}
    trees: list[tuple[str, Path | None]] = [("small-files", None)]
    if args.venv:
        trees.append(("venv", Path(args.venv)))
    loop = os.geteuid() == 0 and not args.no_loop
    for name, src in trees:
        # the trees, every store, the registry's storage and the peers' copies, ~10 of each
        size = (8 << 30) + 12 * (args.files if src is None else 20_000) * (8 << 10)
        with scratch(args.base, "velo-bench-remote-", size, 4096, loop) as base:
            tree = base / "tree"
            if src is None:
                make_tree(tree, args.files)
            else:
                copy_tree(src, tree)
            out[name] = measure(base, tree, args.repeat, not args.no_ostree)
        show(name, out[name])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "remote.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
