"""Build the cffi extension ``native._bitmap`` in place.

Run from the repository root as ``python -m native.build`` (``make ext``).
The shared object lands next to this file, so ``from native._bitmap import
ffi, lib`` works from the repo root and from inside nbdkit once the root is
on ``sys.path``.

The cdef is read from the marked region of bitmap.h so the declarations are
written once.  Flags are plain ``-O3``: no ``-march=native``, because the CI
machine may be another CPU; bitmap.c picks POPCNT at load time instead.
"""

import os
import re
import warnings

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _read_cdef(header_path):
    with open(header_path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", text, re.S)
    if m is None:
        raise RuntimeError(f"{header_path}: no CDEF BEGIN/END region")
    return m.group(1)


ffibuilder = FFI()
ffibuilder.cdef(_read_cdef(os.path.join(HERE, "bitmap.h")))
ffibuilder.set_source(
    "native._bitmap",
    '#include "bitmap.h"\n',
    # Relative to the repo root: compile() runs there (tmpdir=ROOT), and an
    # absolute source path would put the object file under ROOT/<abs path>.
    sources=["native/bitmap.c"],
    include_dirs=["native"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"],
)


def main():
    """Compile in place; returns the path of the shared object."""
    with warnings.catch_warnings():
        # setuptools, run with the repo root as cwd, lints pyproject.toml
        # (license table, README); that is not about this extension.
        warnings.simplefilter("ignore")
        return ffibuilder.compile(tmpdir=ROOT, verbose=False)


if __name__ == "__main__":
    print(main())
