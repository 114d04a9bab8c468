"""Where the UI test finds its browser, and what it does when there is none.

The UI test drives the system Chromium (Playwright's own download needs internet). `make test`
installs it when it runs as root (CI); elsewhere it may be missing, and then the browser test
skips with a reason that says how to get it, instead of failing the whole suite. CI sets
MMCTR_REQUIRE_BROWSER=1 (.ci/run), so there a missing browser is a failure, not a skip.
"""

import os
import shutil
from pathlib import Path

import pytest

DEFAULT = Path("/usr/bin/chromium")
HOW_TO_GET_IT = (
    "install it with `sudo apt-get update && sudo apt-get install -y chromium` (Debian/Ubuntu; "
    "`make test` does this itself when run as root), or set MMCTR_CHROMIUM to a Chromium binary. "
    "(`playwright install` needs internet and is not used.)"
)


def find_chromium(env: dict | None = None) -> Path | None:
    """MMCTR_CHROMIUM when set (and then only it), else `chromium` on PATH, else /usr/bin/chromium."""
    env = os.environ if env is None else env
    if env.get("MMCTR_CHROMIUM"):
        candidates = [Path(env["MMCTR_CHROMIUM"])]
    else:
        on_path = shutil.which("chromium", path=env.get("PATH"))
        candidates = [Path(on_path)] if on_path else []
        candidates.append(DEFAULT)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def chromium_or_skip(env: dict | None = None) -> Path:
    """The browser to drive; skip (or fail, where MMCTR_REQUIRE_BROWSER=1) when there is none."""
    env = os.environ if env is None else env
    path = find_chromium(env)
    if path is not None:
        return path
    where = f"MMCTR_CHROMIUM={env['MMCTR_CHROMIUM']} is not an executable" if env.get("MMCTR_CHROMIUM") else (
        "Chromium not found (no `chromium` on PATH, no /usr/bin/chromium)"
    )
    message = f"{where}: the browser test needs it; {HOW_TO_GET_IT}"
    if env.get("MMCTR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} MMCTR_REQUIRE_BROWSER=1 (CI) makes a missing browser an error.")
    pytest.skip(message)
