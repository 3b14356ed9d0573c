"""The benchmark scripts run in a smoke size, so that they cannot rot (no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_methods.py", "bench_pgd.py", "bench_variable_length.py"])
def test_benchmark_smoke_run_writes_its_figures(script, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "benchmarks/" in done.stdout  # the command line is printed with the figures
    result = json.loads(out.read_text())
    assert result  # figures were written
    if script == "bench_methods.py":
        rows = {r["row"]: r for r in result["rows"]}
        assert {"CE", "NSR", "jacob", "jacob (1 projection)", "advls", "data: training loader",
                "eval: clean forward", "eval: PGD-100"} == set(rows)
        assert all(r["seconds_per_sample"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
