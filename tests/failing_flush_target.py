# A copy target whose writes succeed and whose flush always fails (nbdkit
# 1.32's error filter cannot inject flush errors):
#
#   nbdkit -U SOCK python tests/failing_flush_target.py size=2097152
import errno

import nbdkit

API_VERSION = 2
_size = 0
_data = bytearray()


def config(key, value):
    global _size, _data
    if key != "size":
        raise RuntimeError(f"unknown parameter: {key!r}")
    _size = int(value)
    _data = bytearray(_size)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_flush(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = _data[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _data[offset:offset + len(buf)] = buf


def flush(h, flags):
    nbdkit.set_error(errno.EIO)
    raise RuntimeError("this target fails every flush")
