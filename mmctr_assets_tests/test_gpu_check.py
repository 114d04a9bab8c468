"""benchmarks/gpu_check.py in its reduced CPU mode: the one command a GPU machine runs must work
end to end and print the JSON lines README.md documents (on CPU: every section, smaller sizes)."""

import json
import os
import subprocess
import sys

from mmctr_assets import settings

SCRIPT = settings.PACKAGE_DIR.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_and_prints_every_section(tmp_path):
    env = os.environ | {"MMCTR_STATE_DIR": str(tmp_path / "state"), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [line for line in lines if "error" in line]
    assert proc.returncode == 0 and not errors, (errors, proc.stderr[-3000:])
    by_check: dict[str, list[dict]] = {}
    for line in lines:
        by_check.setdefault(line["check"], []).append(line)
    assert set(by_check) == {"device", "clip", "dcn_din_train", "dcn_din_predict", "graph"}
    device = by_check["device"][0]
    assert device["device"] == "cpu" and device["torch"] == __import__("torch").__version__
    clip = {(c["precision"], c["decode_on"]): c for c in by_check["clip"]}
    assert {("fp32", "cpu"), ("bf16", "cpu")} <= set(clip)
    for c in clip.values():
        assert c["bare_forward_items_per_s"] > 0 and c["encode_items_per_s"] > 0 and c["ratio"] > 0
    for name in ("dcn_din_train", "dcn_din_predict"):
        assert {c["precision"] for c in by_check[name]} == {"fp32", "bf16"}
        assert all(c["batch_size"] == 4096 and c["ratio"] > 0 for c in by_check[name])
    graph = by_check["graph"][0]
    assert list(graph["wall_s"]) == ["raw", "clip_embeddings", "item2vec_embeddings", "fused_item_embeddings",
                                     "dcn_din_model", "predictions", "submission_zip"]
    assert all(v > 0 for v in graph["wall_s"].values())
    assert not list(tmp_path.glob("mmctr-gpu-check-*"))  # scratch removed
