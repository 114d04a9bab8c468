"""lib/io.py: a full disk during any atomic write names the file and the space, and leaves no partial
file and the previous file unchanged. Once with an injected ENOSPC (runs everywhere), once on a real
1 MB tmpfs (where this machine lets an unprivileged user namespace mount one)."""

import errno
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from mmctr_assets.lib import io


def test_injected_enospc_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    dest = tmp_path / "raw" / "train.parquet"
    io.write_parquet_atomic(pl.DataFrame({"a": [1, 2, 3]}), dest)
    previous = dest.read_bytes()

    def full_disk(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\0" * 300_000)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    with pytest.raises(io.DiskFullError) as caught:
        io.write_parquet_atomic(pl.DataFrame({"a": np.arange(10)}), dest)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert f"no space left on device writing {dest}" in message
    assert "the disk filled after 0.3 MB of the new file" in message and "It needs more than 0.3 MB" in message
    assert "The partial file was removed; the previous train.parquet" in message and "is unchanged" in message
    assert dest.read_bytes() == previous
    assert sorted(p.name for p in dest.parent.iterdir()) == ["train.parquet"]  # no temp file left


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not a disk problem"):
        with io.atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("not a disk problem")
    assert list(tmp_path.iterdir()) == []


WRITES = textwrap.dedent("""
    import json, sys, zipfile
    from pathlib import Path
    import numpy as np, polars as pl, torch
    from mmctr_assets.lib.ctr.artifacts import save_weights
    from mmctr_assets.lib.io import DiskFullError, atomic_path, write_parquet_atomic

    out = Path(sys.argv[1])
    (out / "snapshot.parquet").write_bytes(b"previous snapshot")

    def checkpoint():  # the trainer's best.pt and the model file are written this way
        save_weights({"config": {}}, {"w": torch.randn(600_000)}, out / "best.pt")

    def archive():
        with atomic_path(out / "submission.zip") as tmp, zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr("prediction.csv", np.random.default_rng(0).random(300_000).tobytes())

    def snapshot():
        frame = pl.DataFrame({"a": np.random.default_rng(0).random(400_000)})
        write_parquet_atomic(frame, out / "snapshot.parquet", compression="uncompressed")

    said = {}
    for name, write in [("checkpoint", checkpoint), ("zip", archive), ("snapshot", snapshot)]:
        try:
            write()
            said[name] = "written"
        except DiskFullError as e:
            said[name] = str(e)
    said["files"] = sorted(p.name for p in out.iterdir())
    said["snapshot"] += " | " + (out / "snapshot.parquet").read_text()
    print(json.dumps(said))
""")


def _tmpfs_usable(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_real_full_disk_gives_the_same_clear_error_for_checkpoint_zip_and_snapshot(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if not _tmpfs_usable(mount):
        pytest.skip("this machine does not let an unprivileged user namespace mount a tmpfs (unshare -r -m); "
                    "test_injected_enospc_names_the_file_and_keeps_the_previous_one covers the logic")
    (tmp_path / "writes.py").write_text(WRITES)
    script = f"mount -t tmpfs -o size=1m tmpfs {mount} && exec {sys.executable} {tmp_path / 'writes.py'} {mount}"
    done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    for name, file in [("checkpoint", "best.pt"), ("zip", "submission.zip"), ("snapshot", "snapshot.parquet")]:
        assert said[name].startswith(f"[Errno 28] no space left on device writing {mount / file}: the disk filled "
                                     "after "), said[name]
        assert "It needs more than" in said[name] and "The partial file was removed" in said[name]
    # torch reports a full disk only as "unexpected pos": recognised by the free space left
    assert "unexpected pos" in said["checkpoint"]
    assert "the previous snapshot.parquet (0.0 MB) is unchanged" in said["snapshot"]
    assert said["snapshot"].endswith(" | previous snapshot")  # the earlier file, byte for byte
    assert said["files"] == ["snapshot.parquet"]  # no partial best.pt, zip or temp file
