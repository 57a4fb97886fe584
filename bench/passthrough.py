# Minimal pass-through nbdkit python plugin: the floor that any Python plugin
# pays for crossing into Python per request.
#
#   nbdkit -f -U /tmp/pt.sock --threads 2 python bench/passthrough.py file=/dev/shm/disk.img
#
# Keys: file= (required; an existing regular file, served read-write),
# keep=true (call nbdplugin.threadstate.keep() in pwrite, as cgmirror's
# plugin does: the floor of a plugin that does not rebuild a Python thread
# state per request; default false, the bare plugin).
import errno
import os
import sys

import nbdkit

API_VERSION = 2

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_path = None
_threadstate = None     # nbdplugin.threadstate with keep=true


def thread_model():
    # No shared state beyond one fd per connection used with positional I/O,
    # so there is no lock to name: requests may overlap freely.
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path, _threadstate
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "keep":
        if value not in ("true", "false"):
            raise RuntimeError(f"keep={value!r}: expected true or false")
        _threadstate = None
        if value == "true":
            if _ROOT not in sys.path:
                sys.path.insert(0, _ROOT)
            from nbdplugin import threadstate
            _threadstate = threadstate
    else:
        raise RuntimeError(f"unknown parameter: {key!r}")


def config_complete():
    if _path is None:
        raise RuntimeError("file= is required")
    if not os.path.isfile(_path):
        raise RuntimeError(f"file={_path!r}: not a regular file")


def open(readonly):
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(h):
    os.close(h)
    if _threadstate is not None:
        _threadstate.release_dead()


def get_size(h):
    return os.fstat(h).st_size


def can_multi_conn(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def pread(h, buf, offset, flags):
    n = os.preadv(h, [buf], offset)
    if n != len(buf):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"short read: {n} of {len(buf)} bytes at {offset}")


def pwrite(h, buf, offset, flags):
    if _threadstate is not None:
        _threadstate.keep()
    n = os.pwrite(h, buf, offset)
    if n != len(buf):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"short write: {n} of {len(buf)} bytes at {offset}")
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(h)


def flush(h, flags):
    os.fdatasync(h)
