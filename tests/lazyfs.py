"""A FUSE file system that forgets what was not fsync'd (power-loss tests).

In the spirit of LazyFS: what a process writes is visible to every reader at
once, but it becomes durable only when it is synced, and ``power_cut()``
throws away everything that was not.  After ``reboot()`` the file system
shows exactly its durable state, as a disk does after the power comes back.

Usage (also outside pytest)::

    with LazyFS(mountpoint) as fs:
        ...                      # processes use files under mountpoint
        fs.arm(after=40)         # or fs.power_cut() now
        fs.wait_cut(timeout=10)  # then kill -9 the processes using it
        fs.reboot()              # the durable state only, writable again

Durability model (strict ext4 semantics without its helpful extras):

- File data and size: ``fsync``/``fdatasync`` of the file (any descriptor of
  it) or ``sync()`` makes the file's current content durable.  Attributes
  other than the size (mode, owner, times) are kept at once: nothing here
  depends on them surviving or not.
- Names: a create, mkdir, unlink, rmdir or rename is durable only when the
  directory that holds the name is fsync'd (a rename needs both directories).
  A file fsync'd but never named durably is lost whole, as on ext4 without
  its auto_da_alloc and journal-order luck.
- ``survive``: by default every unsynced byte is lost.  With ``survive=p`` a
  power cut keeps each unsynced 4 KiB page of a file's data with
  probability p (and the unsynced size with probability p): a disk cache
  writes back pages in any order, so an in-place rewrite may be torn.
  ``set_survive(p)`` changes it between cuts.
- A cut freezes the file system: from that moment every operation fails with
  EIO (a machine without power does nothing), until ``reboot()``.
  ``arm(after=N)`` cuts just before the N+1-th mutating operation (write,
  truncate, sync, create, rename, unlink, ...), so a test can cut inside a
  sequence of writes and syncs, not only between them.

Why everything lives in memory, not over a backing directory: the model
needs two versions of every file and directory (live and durable); keeping
both in Python objects is a few lines, while a pass-through would need a
second, hidden copy of the tree anyway.  The state dirs this serves are small.

The file system runs in a child process (``python lazyfs.py MOUNTPOINT``)
driven by one-line commands on its stdin: a test process may itself read
and write the mount without deadlocking against its own FUSE server, and the
child unmounts when its stdin closes, so a test that dies leaves no mount.
Files are opened with ``direct_io`` and attributes are not cached by the
kernel: after a reboot nobody reads a forgotten page from the page cache.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import sys
import time

PAGE = 4096


def unavailable() -> str | None:
    """Why a LazyFS cannot be mounted here (None: it can)."""
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (FUSE)"
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError:
        return "needs pyfuse3 and trio (apt-get install python3-pyfuse3 fuse3)"
    return None


def mounted(mountpoint: str) -> bool:
    """True while /proc/mounts lists ``mountpoint``."""
    mp = os.path.realpath(mountpoint)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mp for line in f)


class LazyFSError(Exception):
    """The file system could not be mounted or did not answer a command."""


class LazyFS:
    """A lazy file system mounted on ``mountpoint`` by a child process."""

    def __init__(self, mountpoint: str, survive: float = 0.0, seed: int | None = None):
        self.mountpoint = os.path.realpath(mountpoint)
        self.survive = survive
        self.seed = random.randrange(1 << 32) if seed is None else seed
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LazyFS:
        self.mount()
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()

    def mount(self, timeout: float = 20.0) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.mountpoint,
             str(self.survive), str(self.seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        try:
            reply = self.proc.stdout.readline()   # "ready" once mounted
            if reply.strip() != "ready":
                raise LazyFSError(f"lazyfs did not mount {self.mountpoint}: {reply!r}")
            deadline = time.monotonic() + timeout
            while not mounted(self.mountpoint):
                if time.monotonic() > deadline:
                    raise LazyFSError(f"{self.mountpoint} not in /proc/mounts")
                time.sleep(0.01)
        except BaseException:
            self.unmount()
            raise

    def unmount(self, timeout: float = 20.0) -> None:
        """Unmount and reap the server; idempotent, safe after a failure."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            try:
                proc.stdin.close()            # EOF: the server unmounts and exits
            except OSError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            proc.stdout.close()
        finally:
            if mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                               check=False, capture_output=True)

    def _call(self, *words) -> dict:
        if self.proc is None:
            raise LazyFSError("lazyfs is not mounted")
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise LazyFSError(f"lazyfs server ended (status {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise LazyFSError(reply["error"])
        return reply

    def power_cut(self) -> None:
        """Lose every unsynced change now and freeze (EIO) until reboot()."""
        self._call("cut")

    def arm(self, after: int) -> None:
        """Cut just before the ``after``+1-th mutating operation from now."""
        self._call("arm", int(after))

    def is_cut(self) -> bool:
        return self._call("state")["cut"]

    def wait_cut(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for an armed cut; True if it happened."""
        deadline = time.monotonic() + timeout
        while not self.is_cut():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def set_survive(self, p: float) -> None:
        """From now on a cut keeps each unsynced page with probability ``p``."""
        self.survive = p
        self._call("survive", float(p))

    def reboot(self) -> None:
        """Power back: the durable state only, and usable again."""
        self._call("reboot")

    def sync(self) -> None:
        """Make everything durable (``sync(1)`` of the whole file system)."""
        self._call("sync")

    def stats(self) -> dict:
        """Counters: mutating operations, cuts."""
        return self._call("state")


# --------------------------------------------------------------- the server
# Everything below runs in the child process only.

class _Node:
    """An inode: live and durable content (file bytes or directory entries)."""

    def __init__(self, ino: int, mode: int, uid: int, gid: int):
        self.ino = ino
        self.mode = mode
        self.uid, self.gid = uid, gid
        self.times = time.time_ns()
        self.is_dir = stat.S_ISDIR(mode)
        self.data = bytearray()               # files: live bytes
        self.ddata = b""                      # files: durable bytes
        self.entries: dict[bytes, int] = {}   # dirs: live name -> ino
        self.dentries: dict[bytes, int] = {}  # dirs: durable name -> ino
        self.parent = 0                       # dirs: live parent (for "..")

    def sync(self) -> None:
        if self.is_dir:
            self.dentries = dict(self.entries)
        else:
            self.ddata = bytes(self.data)


def _serve(mountpoint: str, survive: float, seed: int) -> None:
    import pyfuse3
    import trio

    rng = random.Random(seed)
    root = pyfuse3.ROOT_INODE
    EIO = pyfuse3.FUSEError(errno.EIO)

    class Ops(pyfuse3.Operations):
        def __init__(self):
            super().__init__()
            self.nodes: dict[int, _Node] = {}
            self.next_ino = root
            self.fhs: dict[int, int] = {}     # fh -> ino
            self.next_fh = 1
            self.cut = False
            self.armed: int | None = None
            self.mutations = 0
            self.cuts = 0
            self.survive = survive
            r = self._new(stat.S_IFDIR | 0o755, 0, 0)
            r.parent = root
            r.sync()

        # ---------------------------------------------------- the model

        def _new(self, mode, uid, gid) -> _Node:
            n = _Node(self.next_ino, mode, uid, gid)
            self.nodes[n.ino] = n
            self.next_ino += 1
            return n

        def _alive(self) -> None:
            if self.cut:
                raise EIO

        def _mutate(self) -> None:
            """Every operation that changes state passes here first."""
            self._alive()
            if self.armed is not None:
                if self.armed <= 0:
                    self.power_cut()
                    raise EIO
                self.armed -= 1
            self.mutations += 1

        def power_cut(self) -> None:
            self.cut = True
            self.armed = None
            self.cuts += 1
            for n in self.nodes.values():
                if n.is_dir:
                    n.entries = dict(n.dentries)
                elif self.survive and bytes(n.data) != n.ddata:
                    n.data = bytearray(self._torn(n))
                    n.ddata = bytes(n.data)
                else:
                    n.data = bytearray(n.ddata)
            # Keep only what the durable tree reaches; the rest never existed.
            seen, todo = set(), [root]
            while todo:
                ino = todo.pop()
                if ino in seen:
                    continue
                seen.add(ino)
                n = self.nodes[ino]
                for child in n.entries.values():
                    if self.nodes[child].is_dir:
                        self.nodes[child].parent = ino
                    todo.append(child)
            for ino in list(self.nodes):
                if ino not in seen:
                    del self.nodes[ino]

        def _torn(self, n: _Node) -> bytes:
            """A cut file when each unsynced page survives with ``survive``."""
            live, old = bytes(n.data), n.ddata
            size = len(live) if rng.random() < self.survive else len(old)
            out = bytearray(old[:size].ljust(size, b"\0"))
            for p in range(0, size, PAGE):
                if rng.random() < self.survive:
                    piece = live[p:p + PAGE].ljust(min(PAGE, size - p), b"\0")
                    out[p:p + len(piece)] = piece[:size - p]
            return bytes(out)

        def command(self, words: list[str]) -> dict:
            if words[0] == "cut":
                if not self.cut:
                    self.power_cut()
            elif words[0] == "arm":
                self.armed = int(words[1])
            elif words[0] == "survive":
                self.survive = float(words[1])
            elif words[0] == "reboot":
                self.cut = False
            elif words[0] == "sync":
                self._alive()
                for n in self.nodes.values():
                    n.sync()
            elif words[0] != "state":
                return {"error": f"unknown command {words[0]!r}"}
            return {"cut": self.cut, "mutations": self.mutations, "cuts": self.cuts}

        # ---------------------------------------------------- helpers

        def _node(self, ino) -> _Node:
            n = self.nodes.get(ino)
            if n is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return n

        def _attr(self, n: _Node) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = n.ino
            a.st_mode = n.mode
            a.st_nlink = 2 if n.is_dir else 1
            a.st_uid, a.st_gid = n.uid, n.gid
            a.st_size = len(n.data)
            a.st_blksize = PAGE
            a.st_blocks = -(-len(n.data) // 512)
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.times
            a.attr_timeout = a.entry_timeout = 0   # the kernel must ask us
            return a

        def _child(self, parent, name) -> _Node:
            p = self._node(parent)
            if not p.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            ino = p.entries.get(name)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.nodes[ino]

        def _make(self, parent, name, mode, ctx) -> _Node:
            self._mutate()
            p = self._node(parent)
            if name in p.entries:
                raise pyfuse3.FUSEError(errno.EEXIST)
            n = self._new(mode, ctx.uid, ctx.gid)
            if n.is_dir:
                n.parent = parent
                n.sync()                       # an empty directory is empty durably
            p.entries[name] = n.ino
            return n

        def _open(self, ino) -> pyfuse3.FileInfo:
            fh = self.next_fh
            self.next_fh += 1
            self.fhs[fh] = ino
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

        # ---------------------------------------------------- operations

        async def lookup(self, parent, name, ctx=None):
            self._alive()
            if name == b".":
                return self._attr(self._node(parent))
            if name == b"..":
                return self._attr(self._node(self._node(parent).parent))
            return self._attr(self._child(parent, name))

        async def getattr(self, inode, ctx=None):
            return self._attr(self._node(inode))

        async def setattr(self, inode, attr, fields, fh, ctx):
            n = self._node(inode)
            if fields.update_size:
                self._mutate()
                if attr.st_size < len(n.data):
                    del n.data[attr.st_size:]
                else:
                    n.data.extend(bytes(attr.st_size - len(n.data)))
            else:
                self._alive()
            if fields.update_mode:
                n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                n.uid = attr.st_uid
            if fields.update_gid:
                n.gid = attr.st_gid
            if fields.update_mtime:
                n.times = attr.st_mtime_ns
            return self._attr(n)

        async def forget(self, inode_list):
            pass

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = PAGE
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
            s.f_files = s.f_ffree = s.f_favail = 1 << 20
            s.f_namemax = 255
            return s

        async def opendir(self, inode, ctx):
            self._alive()
            if not self._node(inode).is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return self._open(inode).fh

        async def readdir(self, fh, start_id, token):
            self._alive()
            n = self._node(self.fhs[fh])
            names = sorted(n.entries.items())
            for i, (name, ino) in enumerate(names[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[ino]), i + 1):
                    break

        async def releasedir(self, fh):
            self.fhs.pop(fh, None)

        async def fsyncdir(self, fh, datasync):
            self._mutate()
            self._node(self.fhs[fh]).sync()

        async def mkdir(self, parent_inode, name, mode, ctx):
            return self._attr(self._make(parent_inode, name, stat.S_IFDIR | mode, ctx))

        async def create(self, parent_inode, name, mode, flags, ctx):
            n = self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
            return self._open(n.ino), self._attr(n)

        async def mknod(self, parent_inode, name, mode, rdev, ctx):
            if not stat.S_ISREG(mode):
                raise pyfuse3.FUSEError(errno.EPERM)
            return self._attr(self._make(parent_inode, name, mode, ctx))

        async def open(self, inode, flags, ctx):
            self._alive()
            n = self._node(inode)
            if flags & os.O_TRUNC:
                self._mutate()
                n.data.clear()
            return self._open(inode)

        async def read(self, fh, off, size):
            self._alive()
            return bytes(self._node(self.fhs[fh]).data[off:off + size])

        async def write(self, fh, off, buf):
            self._mutate()
            n = self._node(self.fhs[fh])
            if off > len(n.data):
                n.data.extend(bytes(off - len(n.data)))
            n.data[off:off + len(buf)] = buf
            n.times = time.time_ns()
            return len(buf)

        async def fsync(self, fh, datasync):
            self._mutate()
            self._node(self.fhs[fh]).sync()

        async def flush(self, fh):
            pass

        async def release(self, fh):
            self.fhs.pop(fh, None)

        async def unlink(self, parent_inode, name, ctx):
            self._mutate()
            self._child(parent_inode, name)
            del self.nodes[parent_inode].entries[name]

        async def rmdir(self, parent_inode, name, ctx):
            self._mutate()
            n = self._child(parent_inode, name)
            if not n.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if n.entries:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            del self.nodes[parent_inode].entries[name]

        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new,
                         flags, ctx):
            self._mutate()
            if flags:
                raise pyfuse3.FUSEError(errno.EINVAL)
            n = self._child(parent_inode_old, name_old)
            new = self._node(parent_inode_new)
            old = new.entries.get(name_new)
            if old is not None and old != n.ino:
                o = self.nodes[old]
                if o.is_dir != n.is_dir:
                    raise pyfuse3.FUSEError(errno.EISDIR if o.is_dir else errno.ENOTDIR)
                if o.is_dir and o.entries:
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            del self.nodes[parent_inode_old].entries[name_old]
            new.entries[name_new] = n.ino
            if n.is_dir:
                n.parent = parent_inode_new

    ops = Ops()
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=lazyfs", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)

    async def control():
        """Commands on stdin, one JSON answer a line; EOF unmounts."""
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, cancellable=True)
            if not line.strip():
                break
            try:
                reply = ops.command(line.split())
            except pyfuse3.FUSEError:
                reply = {"error": "the file system is cut (reboot first)"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        pyfuse3.terminate()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control)
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    _serve(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
