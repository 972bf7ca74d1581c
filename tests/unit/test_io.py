"""unite_core.io: atomic writes keep the umask's permissions, fsync before the rename, and turn a full
disk into one line that names the path, leaving the previous file whole."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from tests.ray_fixtures import run_unite, tiny_params, write_params
from unite_core.io import (DiskFullError, atomic_dir, atomic_torch_save, atomic_write, atomic_write_bytes,
                           atomic_write_text)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_files_and_folders_get_the_umask_permissions(tmp_path, umask_027):
    text = atomic_write_text(tmp_path / "a" / "b.json", "{}\n")
    blob = atomic_torch_save({"x": torch.ones(2)}, tmp_path / "c.pt")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "state.pt").write_bytes(b"state")
    assert mode(text) == mode(blob) == 0o640  # mkstemp alone gives 0600
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "a") == 0o750  # mkdtemp alone gives 0700
    assert torch.load(blob, weights_only=True)["x"].sum() == 2
    assert (tmp_path / "ckpt" / "state.pt").read_bytes() == b"state"
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_checkpoints_and_prepared_data_are_not_private(tmp_path):
    """The files the pipeline writes follow the umask (0644 under the usual 022), not 0600."""
    from unite_core.config import config_from_dict
    from unite_core.data import prepare_image_data
    from unite_core.train import save_checkpoint

    old = os.umask(0o022)
    try:
        ckpt = save_checkpoint(tmp_path / "models" / "unite.pt", {"format": "x", "w": torch.zeros(3)})
        prepare_image_data(config_from_dict(tiny_params()).data, tmp_path / "data")
    finally:
        os.umask(old)
    assert mode(ckpt) == 0o644
    for name in ("train.pt", "val.pt", "manifest.json"):
        assert mode(tmp_path / "data" / name) == 0o644, name


def test_the_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_torch_save({"w": torch.zeros(4)}, tmp_path / "ckpt.pt")
    assert events[:2] == ["fsync", "replace"]  # the data, then the rename (then the folder)


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "metrics.json", "old\n")

    def fill(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        atomic_write(target, fill)
    msg = str(info.value)
    assert "\n" not in msg and str(target) in msg and "no space left" in msg
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temp file is gone


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_unite_prepare_on_a_full_disk_ends_in_one_line(tmp_path):
    """A real full file system (a 64 KiB tmpfs as data/): `unite prepare` says which file did not fit.

    Mounting needs root; elsewhere the same path is covered by the injected-ENOSPC test above."""
    data = tmp_path / "data"
    if not _mount_tmpfs(data, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the message")
    try:
        write_params(tmp_path, tiny_params(tracking={"enabled": False}))
        proc = run_unite(["prepare"], cwd=tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert len(lines) == 1 and "no space left on the device to write" in lines[0], proc.stderr[-2000:]
        assert str(data / "digits") in lines[0] and "Traceback" not in proc.stderr
        assert not list((data / "digits").glob("*.tmp")) and not list((data / "digits").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(data)], capture_output=True)


def test_bytes_roundtrip(tmp_path):
    assert atomic_write_bytes(tmp_path / "x.bin", b"\x00\x01").read_bytes() == b"\x00\x01"


def test_stable_hash_is_the_sorted_json_digest_the_run_names_were_made_with():
    import hashlib
    import json

    from unite_core.io import stable_hash

    obj = {"b": [1, 2.5, None], "a": {"y": "x", "k": True}}
    old = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert stable_hash(obj, 12) == old[:12] and stable_hash(obj, 8) == old[:8]
    assert stable_hash({"a": {"k": True, "y": "x"}, "b": [1, 2.5, None]}) == stable_hash(obj)
    assert stable_hash({"p": Path("x")}) == stable_hash({"p": "x"})  # str() of what JSON cannot hold
