"""`make test` on a machine without Chromium: the `browser` target installs it only where it can
(root, apt) and otherwise goes on; the browser test then skips saying how to get it (fails in CI).

The make target runs for real, with a PATH of stand-in `id`/`apt-get` commands, so the root and
non-root branches run on any machine, whoever runs the suite."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _pytest.outcomes import Failed, Skipped
from ui_browser import chromium_or_skip, find_chromium

from mmctr_assets import settings

REPO = settings.PACKAGE_DIR.parent
MAKE = shutil.which("make")


def stand_in(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def make_browser(tmp_path: Path, uid: int, apt_ok: bool | None = None, chromium_on_path: bool = False):
    """Run `make browser` with only stand-ins on PATH; return (result, apt-get calls)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls"
    bin_dir.mkdir()
    stand_in(bin_dir, "id", f"echo {uid}")
    if apt_ok is not None:
        stand_in(bin_dir, "apt-get",
                 f'echo "$*" >> {calls}\n' + ("exit 0" if apt_ok else 'echo "E: no network" >&2; exit 100'))
    if chromium_on_path:
        stand_in(bin_dir, "chromium", "exit 0")
    env = {k: v for k, v in os.environ.items() if k != "MMCTR_CHROMIUM"} | {"PATH": str(bin_dir)}
    result = subprocess.run([MAKE, "-s", "-C", str(REPO), "browser"], env=env, capture_output=True, text=True,
                            timeout=60)
    return result, (calls.read_text().splitlines() if calls.exists() else [])


pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def test_not_root_without_chromium_goes_on_and_says_how(tmp_path):
    result, calls = make_browser(tmp_path, uid=1000, apt_ok=True)
    assert result.returncode == 0, result.stderr
    assert calls == []  # never tries apt-get without root
    assert "sudo apt-get install -y chromium" in result.stdout and "MMCTR_CHROMIUM" in result.stdout


def test_root_installs_chromium_and_a_failed_install_does_not_stop_make_test(tmp_path):
    (tmp_path / "ok").mkdir()
    result, calls = make_browser(tmp_path / "ok", uid=0, apt_ok=True)
    assert result.returncode == 0, result.stderr
    assert calls == ["update -qq", "install -y -qq chromium"]
    (tmp_path / "fail").mkdir()
    result, calls = make_browser(tmp_path / "fail", uid=0, apt_ok=False)
    assert result.returncode == 0, result.stderr
    assert "apt-get failed" in result.stdout and "sudo apt-get install -y chromium" in result.stdout


def test_installed_chromium_is_left_alone(tmp_path):
    result, calls = make_browser(tmp_path, uid=0, apt_ok=True, chromium_on_path=True)
    assert result.returncode == 0 and calls == [] and result.stdout == ""


def test_browser_test_skips_with_advice_or_fails_in_ci(tmp_path):
    env = {"PATH": str(tmp_path), "MMCTR_CHROMIUM": str(tmp_path / "no-chromium")}
    with pytest.raises(Skipped, match=r"sudo apt-get install -y chromium.*MMCTR_CHROMIUM"):
        chromium_or_skip(env)
    with pytest.raises(Failed, match="MMCTR_REQUIRE_BROWSER=1"):
        chromium_or_skip(env | {"MMCTR_REQUIRE_BROWSER": "1"})


def test_an_installed_chromium_is_used_not_skipped(tmp_path):
    stand_in(tmp_path, "chromium", "exit 0")
    assert chromium_or_skip({"PATH": str(tmp_path)}) == tmp_path / "chromium"  # found on PATH
    assert chromium_or_skip({"PATH": "", "MMCTR_CHROMIUM": str(tmp_path / "chromium")}) == tmp_path / "chromium"
    (tmp_path / "not-executable").write_text("")
    assert find_chromium({"PATH": "", "MMCTR_CHROMIUM": str(tmp_path / "not-executable")}) is None
