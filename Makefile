# cgmirror — set-up, tests, demo, VM and benchmarks.  Everything from nothing on
# a fresh Debian 12 machine as root: `make test` and `make demo` call `setup`.

SHELL      := /bin/bash
VENV       := .venv
PY         := $(VENV)/bin/python
STAMPS     := .cache/stamps
APT_PKGS   := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin libssl-dev \
              nbd-client nbd-server qemu-system-x86 qemu-utils \
              busybox-static e2fsprogs socat fio nftables iproute2 \
              python3-venv python3-dev python3-cffi-backend libffi-dev libnbd-dev \
              gcc make sqlite3 xz-utils python3-pyfuse3 fuse3 systemd util-linux \
              etcd-server etcd-client

.PHONY: setup apt venv ext test test-fast demo demo-sites vm vm-test clean \
        bench-bitmap bench-write bench-freeze bench-freeze-sites bench-copy bench-engine \
        bench-granularity bench-mirror bench-resync soak bench-takeover demo-cluster

setup: apt venv ext

# Packages: re-run only when this list changes.
apt: $(STAMPS)/apt
$(STAMPS)/apt: Makefile
	mkdir -p $(STAMPS)
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS)
	touch $@

# The venv sees Debian's python3-libnbd (module `nbd`) through system site-packages.
venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# native/_limits.h (the gate's protocol limits) is generated from wire/protocol.py.
ext: $(STAMPS)/ext
$(STAMPS)/ext: native/bitmap.c native/bitmap.h native/copy.c native/copy.h native/gate.c native/gate.h \
               native/build.py wire/protocol.py $(STAMPS)/venv
	$(PY) -m native.build
	touch $@

# The copier suites once more with the Python engine (the default is the
# native one, native/copy.c): both must keep every guarantee.
COPIER_TESTS := tests/test_targets.py tests/test_copier.py tests/test_coordinator.py \
                tests/test_consistency.py tests/test_pit.py tests/test_baseline_cli.py

test: setup vm
	$(PY) -m pytest -q tests
	CGMIRROR_COPY_ENGINE=python $(PY) -m pytest -q $(COPIER_TESTS)

test-fast: setup
	$(PY) -m pytest -q -m "not vm and not slow" tests

demo: setup
	$(PY) -m harness.demo

# The same demo across network namespaces (slaves in a/b, the coordinator in
# c, targets in r) over TCP with mutual TLS; needs root.
demo-sites: setup
	$(PY) -m harness.demo --sites

# Cluster mode on the host rig (root): etcd on a1 b1 c, three coordinators;
# the leader is killed -9, `mirror status` and `events` show the takeover.
demo-cluster: setup
	$(PY) -m harness.democluster

vm: setup
	$(PY) -m vm.build

vm-test: vm
	$(PY) -m pytest -q -m vm tests

bench-bitmap: setup
	$(PY) bench/bench_bitmap.py

bench-write: setup
	$(PY) bench/bench_write.py

bench-freeze: setup
	$(PY) bench/bench_freeze.py

# Establish time with slaves in two network namespaces over TCP+TLS (root).
bench-freeze-sites: setup
	$(PY) bench/bench_freeze.py --sites

bench-copy: setup
	$(PY) bench/bench_copy.py

bench-engine: setup
	$(PY) bench/bench_engine.py

bench-granularity: setup
	$(PY) bench/bench_granularity.py

# The mirror's fault campaign (tests/soak_mirror.py; root: tmpfs mounts,
# namespaces), on one host and with the primaries in network namespaces over
# TCP+TLS: prints faults injected, groups formed and checked, violations.
# Then the test files whose campaigns `make test` runs as a bounded slice,
# with their full count (CGMIRROR_SOAK=1, tests/cgtest.py `soak`).
SOAK_ROUNDS ?= 60
SOAK_TESTS  := tests/test_power_loss.py tests/test_mirror_power.py \
               tests/test_role_commands.py
soak: setup
	$(PY) tests/soak_mirror.py --rounds $(SOAK_ROUNDS)
	$(PY) tests/soak_mirror.py --sites --rounds $(SOAK_ROUNDS)
	CGMIRROR_SOAK=1 $(PY) -m pytest -q $(SOAK_TESTS)

# RPO, drain amplification, hold times with the mirror running: the default
# run, then pinned (a site per core), over a 1 Gbit/s 20 ms link (root), and a
# database-like workload, one JSON line last.
bench-mirror: setup
	$(PY) bench/bench_mirror.py --pin --link 1gbit,20ms --db

# Failback resync (S | T) against a full copy and a checksum delta copy, 4 GiB.
bench-resync: setup
	$(PY) bench/bench_resync.py

# Cluster mode's takeover on the host rig (root): the leader killed -9 to the
# next group hardened by the new leader, several kills; JSON last line.
bench-takeover: setup
	$(PY) bench/bench_takeover.py

clean:
	rm -rf $(VENV) .cache build *.egg-info native/_bitmap*.so native/_bitmap.c \
	       native/_copy*.so native/_copy.c native/_gate*.so native/_gate.c \
	       native/_limits.h
