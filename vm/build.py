"""Build the loopback VM guest from Debian packages: kernel + initramfs.

    python -m vm.build            # build if inputs changed, print artefact paths
    python -m vm.build --force    # rebuild

Inputs: the Debian kernel package that ``linux-image-amd64`` depends on
(downloaded with ``apt-get download``, unpacked with ``dpkg -x``), the host's
busybox-static, nbd-client and e2fsprogs binaries with their ``ldd`` libraries,
this file and ``vm/init`` (the guest /init, with the script helpers).

Outputs, in ``.cache/vm/<key>/`` (``.cache`` is gitignored):

* ``vmlinux``       the uncompressed ELF kernel taken out of ``vmlinuz``
                    (qemu boots it through PVH, ~2 s faster under TCG than
                    the bzImage path)
* ``initramfs.gz``  newc cpio, gzip: busybox, the modules (in dependency
                    order, listed in ``/lib/modules/load.order``), the tools
                    and their libraries, ``/init``.
* ``manifest.json`` what went in (kernel version, modules, tools, key).

``<key>`` is a hash of the kernel package name + version, the versions of the
host packages copied in, and the text of this file and the guest scripts; a
change of any of them builds a new directory, an unchanged key is a no-op.
``.cache/vm/current`` names the newest build.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / ".cache" / "vm"
INIT_SCRIPT = HERE / "init"

KERNEL_META = "linux-image-amd64"

# Modules we want; their dependencies (from each .ko's .modinfo "depends=")
# are added and ordered automatically.  crc32c_generic: ext4 asks the crypto
# API for "crc32c" (a softdep, not a hard dependency).
ROOT_MODULES = [
    "virtio_pci",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "nbd",
]

# Host binaries copied into the guest with their libraries, and the extra
# names they answer to.  Everything else a workload needs comes from busybox
# (dd, sha256sum, sync -d/-f, timeout, fsfreeze, blockdev, ...).
TOOLS = {
    "/usr/sbin/nbd-client": [],
    "/usr/sbin/mke2fs": ["/usr/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext2"],
    "/usr/sbin/e2fsck": ["/usr/sbin/fsck.ext4"],
    "/usr/sbin/tune2fs": [],
    "/usr/sbin/dumpe2fs": [],
    "/usr/sbin/debugfs": [],
}
EXTRA_FILES = ["/etc/mke2fs.conf"]
# Host packages whose versions enter the cache key (their files are copied).
HOST_PACKAGES = ["busybox-static", "nbd-client", "e2fsprogs", "libc6"]

BUSYBOX = "/bin/busybox"

log = print


# --------------------------------------------------------------------------
# small helpers


def _run(cmd, **kw) -> str:
    return subprocess.run(
        cmd, check=True, text=True, stdout=subprocess.PIPE, **kw
    ).stdout


def kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel linux-image-amd64 depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise RuntimeError(
            f"apt-cache depends {KERNEL_META}: no linux-image dependency in:\n{out}"
            "\n(run apt-get update?)"
        )
    pkg = m.group(1)
    out = _run(["apt-cache", "show", "--no-all-versions", pkg])
    v = re.search(r"^Version:\s*(\S+)", out, re.M)
    if not v:
        raise RuntimeError(f"apt-cache show {pkg}: no Version")
    return pkg, v.group(1)


def host_package_versions() -> dict[str, str]:
    out = _run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *HOST_PACKAGES]
    )
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def cache_key(kpkg: str, kver: str, hostvers: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"{kpkg} {kver}\n".encode())
    for k in sorted(hostvers):
        h.update(f"{k} {hostvers[k]}\n".encode())
    for p in (Path(__file__).resolve(), INIT_SCRIPT):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------
# kernel


def fetch_kernel_deb(kpkg: str, kver: str) -> Path:
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    quoted = kver.replace(":", "%3a")
    want = dl / f"{kpkg}_{quoted}_amd64.deb"
    if want.exists():
        return want
    log(f"vm.build: apt-get download {kpkg}={kver}")
    subprocess.run(
        ["apt-get", "download", "-q", f"{kpkg}={kver}"], cwd=dl, check=True
    )
    if not want.exists():
        cands = sorted(dl.glob(f"{kpkg}_*.deb"))
        if not cands:
            raise RuntimeError(f"apt-get download {kpkg} left no .deb in {dl}")
        want = cands[-1]
    # keep only the newest kernel deb
    for old in dl.glob("linux-image-*.deb"):
        if old != want:
            old.unlink()
    return want


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """Decompress the xz payload of a bzImage into the ELF vmlinux."""
    magic = b"\xfd7zXZ\x00"
    pos = vmlinuz.find(magic)
    while pos >= 0:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = d.decompress(vmlinuz[pos:])
        except lzma.LZMAError:
            out = b""
        if out[:4] == b"\x7fELF":
            return out
        pos = vmlinuz.find(magic, pos + 1)
    raise RuntimeError("no xz-compressed ELF kernel found in vmlinuz")


def elf_section(data: bytes, name: str) -> bytes | None:
    """Contents of section `name` of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 LE file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i):
        # name, type, flags, addr, offset, size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)

    stroff = sh(shstrndx)[4]
    for i in range(shnum):
        nm, _typ, _fl, _addr, off, size = sh(i)
        end = data.index(b"\0", stroff + nm)
        if data[stroff + nm : end].decode() == name:
            return data[off : off + size]
    return None


def modinfo(ko: bytes) -> dict[str, list[str]]:
    sec = elf_section(ko, ".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in sec.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def read_ko(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".zst"):
        raise RuntimeError(f"zstd-compressed module not supported: {path}")
    return data


def resolve_modules(moddir: Path, roots: list[str]) -> list[tuple[str, bytes]]:
    """[(name, ko bytes)] for roots and their dependencies, dependencies first."""
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        base = p.name.split(".ko")[0]
        index[base.replace("-", "_")] = p
    builtin = set()
    bl = moddir / "modules.builtin"
    if bl.exists():
        for line in bl.read_text().split():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))

    ordered: list[tuple[str, bytes]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]):
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise RuntimeError(f"module dependency cycle: {chain + (name,)}")
        if name not in index:
            if name in builtin:
                state[name] = "done"
                return
            raise RuntimeError(f"module {name} not found (needed by {chain})")
        state[name] = "visiting"
        data = read_ko(index[name])
        info = modinfo(data)
        for deps in info.get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep, chain + (name,))
        state[name] = "done"
        ordered.append((name, data))

    for r in roots:
        visit(r, ())
    return ordered


# --------------------------------------------------------------------------
# user-space files


def ldd_files(binary: str) -> list[str]:
    out = _run(["ldd", binary])
    files = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            files.append(m.group(1))
        elif "not found" in line:
            raise RuntimeError(f"ldd {binary}: {line}")
    return files


class Cpio:
    """Minimal writer for the newc (070701) cpio format the kernel unpacks."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1000
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)):
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        self.ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08X}"
            for v in (
                self.ino, mode, 0, 0, 1, 0, len(data),
                0, 0, rdev[0], rdev[1], len(nb), 0,
            )
        )
        b = self.buf
        b.write(hdr.encode() + nb)
        b.write(b"\0" * (-b.tell() % 4))
        b.write(data)
        b.write(b"\0" * (-b.tell() % 4))

    def mkdir(self, path: str, mode: int = 0o755):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644):
        parent = os.path.dirname(path.strip("/"))
        if parent:
            self.mkdir(parent)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str):
        parent = os.path.dirname(path.strip("/"))
        if parent:
            self.mkdir(parent)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600):
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        b = self.buf
        b.write(b"\0" * (-b.tell() % 512))
        return b.getvalue()


def copy_host_file(c: Cpio, path: str, mode: int | None = None):
    real = os.path.realpath(path)
    st = os.stat(real)
    c.file(path, Path(real).read_bytes(), mode if mode is not None else st.st_mode & 0o777)


def build_initramfs(modules: list[tuple[str, bytes]]) -> tuple[bytes, list[str]]:
    c = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys",
              "tmp", "mnt", "run", "etc", "root", "lib/modules"):
        c.mkdir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    c.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")

    libs: set[str] = set()
    for tool, aliases in TOOLS.items():
        copy_host_file(c, tool, 0o755)
        for a in aliases:
            c.symlink(a, os.path.basename(tool))
        libs.update(ldd_files(tool))
    for lib in sorted(libs):
        copy_host_file(c, lib)
    for f in EXTRA_FILES:
        if os.path.exists(f):
            copy_host_file(c, f)
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")

    names = []
    for name, data in modules:
        c.file(f"lib/modules/{name}.ko", data)
        names.append(name)
    c.file("lib/modules/load.order", ("\n".join(names) + "\n").encode())
    return c.finish(), sorted(libs)


# --------------------------------------------------------------------------


def paths(key: str | None = None) -> dict[str, Path]:
    if key is None:
        key = (CACHE / "current").read_text().strip()
    d = CACHE / key
    return {
        "dir": d,
        "kernel": d / "vmlinux",
        "initrd": d / "initramfs.gz",
        "manifest": d / "manifest.json",
    }


def build(force: bool = False) -> dict[str, Path]:
    """Build (or find cached) artefacts; return their paths.  Serialised by a
    lock file, so concurrent callers (pytest workers, make) build once."""
    return _locked_build(force)


def _build(force: bool) -> dict[str, Path]:
    t0 = time.monotonic()
    kpkg, kver = kernel_package()
    hostvers = host_package_versions()
    key = cache_key(kpkg, kver, hostvers)
    p = paths(key)
    if not force and p["manifest"].exists():
        _set_current(key)
        return p

    deb = fetch_kernel_deb(kpkg, kver)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="tmp-") as tmp:
        tmp = Path(tmp)
        root = tmp / "deb"
        log(f"vm.build: dpkg -x {deb.name}")
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise RuntimeError(f"expected one vmlinuz in {deb}: {vmlinuz}")
        kernel_release = vmlinuz[0].name[len("vmlinuz-"):]
        vmlinux = extract_vmlinux(vmlinuz[0].read_bytes())
        moddir = root / "lib" / "modules" / kernel_release
        if not moddir.exists():
            moddir = root / "usr" / "lib" / "modules" / kernel_release
        modules = resolve_modules(moddir, ROOT_MODULES)
        cpio, libs = build_initramfs(modules)

        out = tmp / "out"
        out.mkdir()
        (out / "vmlinux").write_bytes(vmlinux)
        with open(out / "initramfs.gz", "wb") as f:
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(cpio)
        manifest = {
            "key": key,
            "kernel_package": kpkg,
            "kernel_version": kver,
            "kernel_release": kernel_release,
            "modules": [n for n, _ in modules],
            "tools": sorted(TOOLS),
            "libraries": libs,
            "host_packages": hostvers,
            "vmlinux_bytes": len(vmlinux),
            "initramfs_bytes": (out / "initramfs.gz").stat().st_size,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if p["dir"].exists():
            shutil.rmtree(p["dir"])
        os.replace(out, p["dir"])
    _set_current(key)
    # drop older builds
    for d in CACHE.iterdir():
        if d.is_dir() and re.fullmatch(r"[0-9a-f]{16}", d.name) and d.name != key:
            shutil.rmtree(d, ignore_errors=True)
    log(f"vm.build: built {p['dir']} in {time.monotonic() - t0:.1f} s")
    return p


def _set_current(key: str):
    cur = CACHE / "current"
    if not cur.exists() or cur.read_text().strip() != key:
        tmp = CACHE / f"current.{os.getpid()}"
        tmp.write_text(key + "\n")
        os.replace(tmp, cur)


def ensure() -> dict[str, Path]:
    """Artefact paths, building first if needed (what tests call).

    Fast path (no apt-cache, which takes seconds): the current build is used
    if its key still matches the guest scripts, this file and the host
    packages; only `python -m vm.build` (make vm) asks apt for a newer kernel.
    """
    try:
        p = paths()
        m = json.loads(p["manifest"].read_text())
        key = cache_key(m["kernel_package"], m["kernel_version"],
                        host_package_versions())
        if key == m["key"] and p["kernel"].exists() and p["initrd"].exists():
            return p
    except (OSError, ValueError, KeyError):
        pass
    return build(force=False)


def _locked_build(force: bool) -> dict[str, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        return _build(force)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    p = build(force=a.force)
    m = json.loads(p["manifest"].read_text())
    print(f"kernel  {p['kernel']}  ({m['kernel_package']} {m['kernel_version']})")
    print(f"initrd  {p['initrd']}  ({m['initramfs_bytes']} bytes, "
          f"modules: {' '.join(m['modules'])})")
    print(f"vm.build: {time.monotonic() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
