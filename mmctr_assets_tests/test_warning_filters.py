"""A user's commands print no framework Beta/Preview warnings for the APIs we chose knowingly,
and every other warning still shows (mmctr_assets/warning_filters.py)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DAGSTER = str(Path(sys.executable).with_name("dagster"))


@pytest.mark.slow
def test_materialize_from_the_cli_prints_no_beta_or_preview_warnings(tiny_data, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = os.environ | {
        "DAGSTER_HOME": str(home),
        "MMCTR_DATA_DIR": str(tiny_data),
        "MMCTR_OUTPUT_DIR": str(tmp_path / "outputs"),
        "MMCTR_STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("PYTHONWARNINGS", None)
    # `*` makes Dagster's own selection parser use the beta `include_sources`; the step runs in a
    # subprocess that loads the code location again (where `make demo` printed its 157 lines)
    result = subprocess.run(
        [DAGSTER, "asset", "materialize", "-m", "mmctr_assets", "--select", "* and key:raw_item_info"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs" / "raw" / "item_info.parquet").exists()
    # The step's own console lines reach the terminal through a `tail -F` that Dagster stops when the
    # step ends and may lose the last ones on a busy machine (dagster-io/dagster#23336), so the step's
    # complete stderr is read from its compute log file as well
    step_logs = sorted((home / "storage").rglob("compute_logs/*.err"))
    assert step_logs, "the step's compute log was not captured"
    printed = result.stderr + "".join(log.read_text() for log in step_logs)
    noisy = [line for line in printed.splitlines() if "BetaWarning" in line or "PreviewWarning" in line]
    assert noisy == []


def test_other_warnings_still_show(tmp_path):
    """The filters name single APIs: another beta API, and a plain UserWarning, are still printed."""
    script = textwrap.dedent(
        """
        import warnings
        import dagster as dg
        import mmctr_assets  # installs the filters, as loading the code location does

        @dg.asset(backfill_policy=dg.BackfillPolicy.single_run())  # chosen knowingly: silent
        def chosen():
            pass

        warnings.warn("Parameter `something_new` of function `asset` is currently in beta, and may change.",
                      dg.BetaWarning)
        warnings.warn("Function `something_else` is currently in preview.", dg.PreviewWarning)
        warnings.warn("a real problem in our own code", UserWarning)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "backfill_policy" not in result.stderr
    assert "BetaWarning: Parameter `something_new`" in result.stderr
    assert "PreviewWarning: Function `something_else`" in result.stderr
    assert "UserWarning: a real problem in our own code" in result.stderr
