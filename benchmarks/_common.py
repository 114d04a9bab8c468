"""What every benchmark line carries: the machine load beside the result, and peak RSS."""

import json
import os
import resource


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"load_avg_1m": round(one, 2), "load_avg_5m": round(five, 2), "load_avg_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}


def emit(**result) -> None:
    print(json.dumps(result | load()), flush=True)
