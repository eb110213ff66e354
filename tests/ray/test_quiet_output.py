"""Console output of an ncd job on Ray: ncd's own lines by default, Ray's logs only with --verbose."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
JOB = """
import logging, sys
from ncd.config import S3Config
from ray_jobs.session import setup_logging, start_ray
verbose = sys.argv[1] == "1"
setup_logging(verbose)
start_ray(None, S3Config(), verbose)
import ray
logging.getLogger("ncd.job").info("ncd progress line")
logging.getLogger("ncd.job").warning("ncd warning line")
logging.getLogger("faiss.loader").info("third-party info line")
print("rows", ray.data.range(8).map_batches(lambda b: b).count())
"""


def _run(verbose: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", JOB, "1" if verbose else "0"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_ray_logs_only_with_verbose():
    quiet = _run(verbose=False)
    assert "ncd progress line" in quiet and "warning: ncd warning line" in quiet and "rows 8" in quiet
    for noise in ("streaming_executor", "Execution plan", "Token authentication", "Progress bars", "INFO",
                  "third-party info line"):
        assert noise not in quiet, (noise, quiet)
    assert len(quiet.strip().splitlines()) == 3, quiet
    from ray_jobs.session import NOTICE_LOGGERS, RAY_LOGGERS, quiet_ray

    names = RAY_LOGGERS + NOTICE_LOGGERS
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        quiet_ray(True)  # the --verbose side, in this process: Ray's INFO lines pass
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in names)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
