"""Archive extraction: every unsafe member refuses the whole archive before anything is written."""
from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest

from sdk.data_sources import DataSourceError, extract_archive


def _archive(path: Path, members) -> Path:
    """members: (TarInfo, bytes or None)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"pixels"):
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _device(name: str):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


def _fifo(name: str):
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info, None


BAD = {
    "traversal": ([_file("images/a.jpg"), _file("../escaped.txt")], "../escaped.txt", "'..'"),
    "absolute": ([_file("images/a.jpg"), _file("/tmp/absolute.txt")], "/tmp/absolute.txt", "absolute"),
    "symlink_escape": ([_file("images/a.jpg"), _link("images/evil", "../../outside")], "images/evil", "escaping"),
    "symlink_absolute": ([_link("images/etc", "/etc")], "images/etc", "absolute"),
    "hardlink_escape": ([_file("images/a.jpg"), _link("images/hard", "../outside.txt", tarfile.LNKTYPE)],
                        "images/hard", "escaping"),
    # each link alone stays inside; followed through the earlier one, images/up2 is images/../.. (outside)
    "symlink_chain": ([_link("images/up", ".."), _link("images/up2", "up/..")], "images/up2",
                      "escaping the archive ('up/..' leaves the extraction folder, following the archive's links)"),
    "symlink_chain_to_absolute": ([_link("images/tmp", "tmp2"), _link("images/tmp2", "/tmp")], "images/tmp2",
                                  "absolute"),
    # x is inside when it arrives; the later link d -> . moves it outside
    "symlink_moved_by_a_later_link": ([_link("x", "d/e/../.."), _link("d", ".")], "x", "escaping"),
    "file_through_link_chain": ([_link("a", "."), _link("b", "a/a/a/.."), _file("b/escaped.txt")], "b", "escaping"),
    "link_loop": ([_link("a", "b"), _link("b", "a"), _file("a/x.jpg")], "a/x.jpg", "a loop of links"),
    "device": ([_file("images/a.jpg"), _device("images/null")], "images/null", "device"),
    "fifo": ([_file("images/a.jpg"), _fifo("images/pipe")], "images/pipe", "fifo"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsafe_member_refuses_whole_archive(tmp_path, case):
    members, name, reason = BAD[case]
    archive = _archive(tmp_path / "images.tar.gz", members)
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError) as err:
        extract_archive(archive, cache)
    assert repr(name) in str(err.value) and reason in str(err.value)
    # Nothing written: not the good member, not the bad one, not even a temp folder in the cache.
    assert not cache.exists() or not any(cache.rglob("*"))
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "outside.txt").exists()


def test_good_archive_extracts_once_and_is_reused(tmp_path):
    archive = _archive(tmp_path / "images.tar.gz", [
        _file("images/a.jpg", b"A"), _file("images/sub/b.jpg", b"B"), _link("images/c.jpg", "a.jpg"),
    ])
    cache = tmp_path / "cache"
    folder = extract_archive(archive, cache)
    assert (folder / "images" / "a.jpg").read_bytes() == b"A"
    assert (folder / "images" / "sub" / "b.jpg").read_bytes() == b"B"
    assert (folder / "images" / "c.jpg").read_bytes() == b"A"
    marker = folder / "images" / "a.jpg"
    mtime = marker.stat().st_mtime_ns
    # Same content under another name: same cache entry, not extracted again.
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(archive.read_bytes())
    assert extract_archive(copy, cache) == folder and marker.stat().st_mtime_ns == mtime
    assert [p.name for p in (cache / "archives").iterdir()] == [folder.name]


def test_concurrent_extraction_of_one_archive(tmp_path):
    archive = _archive(tmp_path / "images.tar.gz", [_file(f"images/{i}.jpg", bytes(1000)) for i in range(50)])
    cache = tmp_path / "cache"
    results, errors = [], []

    def run():
        try:
            results.append(extract_archive(archive, cache))
        except Exception as exc:  # collected so the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert len(list((results[0] / "images").iterdir())) == 50
    assert [p.name for p in (cache / "archives").iterdir()] == [results[0].name]  # no temp folders left


def test_links_inside_the_archive_pass_the_chain_check(tmp_path):
    archive = _archive(tmp_path / "images.tar.gz", [
        _file("data/images/a.jpg", b"A"), _link("data/current", "images"), _link("data/latest", "current/a.jpg"),
        _link("shortcut", "data/current/../images/a.jpg"),
    ])
    folder = extract_archive(archive, tmp_path / "cache")
    assert (folder / "data" / "latest").read_bytes() == b"A" and (folder / "shortcut").read_bytes() == b"A"


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "images.tar.gz"
    bogus.write_bytes(b"definitely not gzip")
    with pytest.raises(DataSourceError, match="not a readable tar archive"):
        extract_archive(bogus, tmp_path / "cache")
