"""Build the cffi extensions ``native._bitmap``, ``native._copy`` and
``native._gate`` in place.

Run from the repository root as ``python -m native.build`` (``make ext``).
The shared object lands next to this file, so ``from native._bitmap import
ffi, lib`` works from the repo root and from inside nbdkit once the root is
on ``sys.path``.

The cdefs are read from the marked regions of bitmap.h and copy.h so the
declarations are written once.  ``_copy`` (the copy engine) links libnbd
(Debian's libnbd-dev); it is a module of its own so the bitmap kernels stay
free of that dependency; ``_gate`` (the freeze gates, native/gate.c) is the
third.  Flags are plain ``-O3``: no ``-march=native``, because the CI
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


def _builder(module, header, source, libraries=()):
    ffi = FFI()
    ffi.cdef(_read_cdef(os.path.join(HERE, header)))
    ffi.set_source(
        module,
        f'#include "{header}"\n',
        # Relative to the repo root: compile() runs there (tmpdir=ROOT), and an
        # absolute source path would put the object file under ROOT/<abs path>.
        sources=[f"native/{source}"],
        include_dirs=["native"],
        libraries=list(libraries),
        extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"],
    )
    return ffi


ffibuilder = _builder("native._bitmap", "bitmap.h", "bitmap.c")
copybuilder = _builder("native._copy", "copy.h", "copy.c", libraries=["nbd", "pthread"])
gatebuilder = _builder("native._gate", "gate.h", "gate.c",
                       libraries=["pthread", "ssl", "crypto"])


def main():
    """Compile in place; returns the paths of the shared objects."""
    with warnings.catch_warnings():
        # setuptools, run with the repo root as cwd, lints pyproject.toml
        # (license table, README); that is not about these extensions.
        warnings.simplefilter("ignore")
        return [b.compile(tmpdir=ROOT, verbose=False) for b in (ffibuilder, copybuilder, gatebuilder)]


if __name__ == "__main__":
    print(main())
