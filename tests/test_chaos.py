"""bench/chaos.py in its short form, as CI runs it: a job over three real agent processes while
the broker (with persistence) is SIGKILLed twice, an agent is SIGKILLed and the leading
controller is SIGKILLed. No result is lost or duplicated and every output is local inference's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_chaos_short_loses_and_duplicates_nothing(tmp_path, postgres_server) -> None:
    out = tmp_path / "chaos.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--short", "--json", str(out),
                        "--pg", postgres_server.admin_url], capture_output=True, text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "postgresql" and len(result["timeline"]) == 4  # every fault was injected mid-job
    assert result["tasks_lost"] == 0 and result["duplicated"] == 0 and result["results"] == result["samples"]
    assert result["identical_to_local"] and result["quiet_identical"]
