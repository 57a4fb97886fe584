"""BlockStore in both modes, in-process (a "crash" = abandoning the object
without close: everything it wrote has reached the kernel, as after kill -9)."""

import os
import stat

import pytest

from nbdplugin.blockstore import BlockStore, StoreClosed

G = 4096
SIZE = 10 * G + 100          # a short last block


@pytest.fixture
def volume(tmp_path):
    """A volume file whose block b is filled with byte b; yields its fd."""
    path = tmp_path / "vol.img"
    path.write_bytes(b"".join(bytes([b]) * G for b in range(11))[:SIZE])
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def overwrite(fd, block, byte):
    length = min(G, SIZE - block * G)
    os.pwrite(fd, bytes([byte]) * length, block * G)


def read_through(store, fd):
    buf = bytearray(SIZE)
    assert os.preadv(fd, [buf], 0) == SIZE
    store.overlay(buf, 0)
    return bytes(buf)


@pytest.mark.parametrize("durable", [False, True])
def test_saved_blocks_overlay_reads_after_overwrite(tmp_path, volume, durable):
    """Blocks saved before an overwrite read back with their old content; the
    others read live."""
    original = os.pread(volume, SIZE, 0)
    store = BlockStore(str(tmp_path / "s"), volume, G, SIZE, durable=durable)
    assert store.save([2, 10]) == [2, 10]
    assert store.save([2, 3]) == [3]          # a block is saved once
    for b in (2, 3, 10):
        overwrite(volume, b, 0xEE)
    overwrite(volume, 5, 0xEE)                # not saved: reads live
    want = bytearray(original)
    want[5 * G:6 * G] = b"\xee" * G
    assert read_through(store, volume) == want
    assert len(store) == 3 and 10 in store and 5 not in store
    store.close()
    assert os.listdir(tmp_path) == ["vol.img"]


def test_nothing_is_written_before_the_first_save(tmp_path, volume):
    """A store that saved nothing made no file (the cut does no file work)."""
    store = BlockStore(str(tmp_path / "s"), volume, G, SIZE)
    store.close()
    assert os.listdir(tmp_path) == ["vol.img"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_closed_store_refuses_saves_and_stays_deleted(tmp_path, volume, durable):
    """After close, save and overlay raise StoreClosed and no file comes back."""
    store = BlockStore(str(tmp_path / "s"), volume, G, SIZE, durable=durable)
    store.save([1])
    store.close()
    store.close()                             # idempotent
    with pytest.raises(StoreClosed):
        store.save([4])
    with pytest.raises(StoreClosed):
        store.overlay(bytearray(G), 0)
    assert os.listdir(tmp_path) == ["vol.img"]


@pytest.mark.parametrize("durable", [False, True])
def test_store_files_are_private_under_umask_000(tmp_path, volume, durable):
    """The store (and its index) are 0600 whatever the umask."""
    old = os.umask(0)
    try:
        store = BlockStore(str(tmp_path / "s"), volume, G, SIZE, durable=durable)
        store.save([0])
    finally:
        os.umask(old)
    made = [p for p in os.listdir(tmp_path) if p != "vol.img"]
    assert sorted(made) == (["s", "s.idx"] if durable else ["s"])
    for p in made:
        assert stat.S_IMODE(os.stat(tmp_path / p).st_mode) == 0o600
    store.close()


def test_durable_index_survives_a_crash_and_lists_exactly_the_saved_blocks(tmp_path, volume):
    """Reopened after a crash, a durable store lists exactly the blocks whose
    save returned, with their old content, and takes more saves after them."""
    original = os.pread(volume, SIZE, 0)
    path = str(tmp_path / "s")
    store = BlockStore(path, volume, G, SIZE, durable=True)
    store.save([7, 1])
    store.save([10])
    for b in (1, 7, 10):
        overwrite(volume, b, 0xAA)
    del store                                 # crash: no close

    again = BlockStore.reopen(path, volume, G, SIZE)
    assert sorted(again.index) == [1, 7, 10]
    assert read_through(again, volume) == original
    assert again.save([1, 4]) == [4]          # appends after the old records
    overwrite(volume, 4, 0xAA)
    del again

    third = BlockStore.reopen(path, volume, G, SIZE)
    assert sorted(third.index) == [1, 4, 7, 10]
    assert read_through(third, volume) == original
    third.close()
    assert os.listdir(tmp_path) == ["vol.img"]


def test_a_torn_last_index_record_is_skipped(tmp_path, volume):
    """A record cut short by a crash (its save never returned, its block was
    never overwritten) is not listed; the records before it are."""
    path = str(tmp_path / "s")
    store = BlockStore(path, volume, G, SIZE, durable=True)
    store.save([3])
    store.save([6])
    del store
    with open(path + ".idx", "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.truncate(size - 5)
    again = BlockStore.reopen(path, volume, G, SIZE)
    assert sorted(again.index) == [3]
    assert again.save([6]) == [6]             # saved anew, after the good record
    del again
    assert sorted(BlockStore.reopen(path, volume, G, SIZE).index) == [3, 6]


def test_reopen_without_a_store_is_empty(tmp_path, volume):
    """No store on disk (nothing was ever saved): an empty index."""
    store = BlockStore.reopen(str(tmp_path / "s"), volume, G, SIZE)
    assert len(store) == 0
    assert store.save([0]) == [0]
    store.close()


def test_the_non_durable_mode_keeps_no_index_file(tmp_path, volume):
    """The PiT's mode writes the store only: nothing to sync, nothing to reopen."""
    store = BlockStore(str(tmp_path / "s"), volume, G, SIZE)
    store.save([0, 1])
    assert sorted(os.listdir(tmp_path)) == ["s", "vol.img"]
    store.close()


def test_an_index_without_its_store_is_an_error(tmp_path, volume):
    """Saved blocks whose copies are gone cannot be overlaid: reopen says so."""
    path = str(tmp_path / "s")
    store = BlockStore(path, volume, G, SIZE, durable=True)
    store.save([2])
    del store
    os.unlink(path)
    with pytest.raises(FileNotFoundError, match="lists 1 blocks"):
        BlockStore.reopen(path, volume, G, SIZE)


@pytest.mark.parametrize("refusal", [None, "EXDEV", "EINVAL"])
def test_saves_are_the_same_copied_in_the_kernel_or_not(tmp_path, volume, monkeypatch,
                                                        refusal):
    """Where copy_file_range is refused (another file system, a device),
    saves fall back to read and write and keep the same content."""
    import errno
    from nbdplugin import blockstore
    monkeypatch.setattr(blockstore, "_KERNEL_COPY", [True])
    if refusal is not None:
        def refuse(*args):
            raise OSError(getattr(errno, refusal), "refused")
        monkeypatch.setattr(blockstore.os, "copy_file_range", refuse)
    store = BlockStore(str(tmp_path / "s"), volume, G, SIZE, durable=True)
    before = read_through(store, volume)
    assert store.save([10, 3, 4]) == [10, 3, 4]
    for b in (10, 3, 4):
        overwrite(volume, b, 0xEE)
    assert read_through(store, volume) == before
    assert blockstore._KERNEL_COPY[0] is (refusal is None)
    store.close()


def test_a_failed_kernel_copy_of_another_kind_fails_the_save(tmp_path, volume,
                                                             monkeypatch):
    """An I/O error is not a refusal: the save fails and lists nothing."""
    import errno
    from nbdplugin import blockstore
    monkeypatch.setattr(blockstore, "_KERNEL_COPY", [True])

    def broken(*args):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(blockstore.os, "copy_file_range", broken)
    store = BlockStore(str(tmp_path / "s"), volume, G, SIZE, durable=True)
    with pytest.raises(OSError):
        store.save([2])
    assert 2 not in store
    store.close()
