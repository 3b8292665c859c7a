"""``edgesdk demo`` end to end, as a newcomer runs it: real training, conversion, agent
processes, rollouts and a distributed job on an embedded broker; nothing left running."""

import json
import re
import socket

from fleet.broker import free_port


def test_the_demo_runs_end_to_end_and_cleans_up(edgesdk_cli, tmp_path) -> None:
    work, report = tmp_path / "work", tmp_path / "report"
    r = edgesdk_cli("demo", "--devices", "2", "--report-dir", report, "--work-dir", work, "--epochs", "6")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = re.findall(r"^\[(\d)/9\]", r.stdout, flags=re.M)
    assert steps == [str(i) for i in range(1, 10)]
    assert r.stdout.count("SUCCEEDED (2 of 2 devices succeeded)") == 2
    accuracy = float(re.search(r"^demo finished: accuracy ([\d.]+)% across 2 agents", r.stdout, flags=re.M).group(1))
    assert accuracy > 90
    assert re.search(r"demo-1: \d+ % of the samples", r.stdout) and re.search(r"demo-2: \d+ % of the samples", r.stdout)
    for name in ("report.md", "conversion.png", "job.png", "report.json"):
        assert (report / name).stat().st_size > 0
    text = (report / "report.md").read_text()
    assert "## Distributed job" in text and "| demo-1 |" in text and "![per-device throughput over time](job.png)" in text
    port = int(re.search(r"broker on mqtt://127.0.0.1:(\d+)", r.stdout).group(1))
    with socket.socket() as s:  # the embedded broker is gone: nothing listens on its port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not listeners
        s.bind(("127.0.0.1", port))
        s.listen()
    assert "agents exited with 0, 0 (SIGTERM: clean shutdown)" in r.stdout
    import os

    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(work) in cmd:
            leftovers.append(cmd)
    assert leftovers == []


def test_the_demo_fails_clearly_without_a_broker(edgesdk_cli, tmp_path) -> None:
    r = edgesdk_cli("demo", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--work-dir", tmp_path)
    assert r.returncode == 17
    assert re.match(r"error: cannot reach the broker at 127\.0\.0\.1:\d+ \(Connection refused\): start it, or leave out "
                    r"--broker to use an embedded one$", r.stderr.strip().splitlines()[-1])


def test_the_demo_can_leave_its_fleet_running(edgesdk_cli, tmp_path) -> None:
    import os
    import signal
    import time

    r = edgesdk_cli("demo", "--devices", "1", "--keep", "--work-dir", tmp_path / "work", "--epochs", "3")
    pids = []
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        env_line = re.search(r"EDGESDK_FLEET_BROKER=(\S+) EDGESDK_FLEET_STATE=(\S+) edgesdk fleet devices", r.stdout)
        m = re.search(r"agents: pids ([\d ]+), broker pid (\d+)", r.stdout)
        pids = [int(p) for p in m.group(1).split()] + [int(m.group(2))]
        listed = edgesdk_cli("fleet", "devices", "--json",
                             env={"EDGESDK_FLEET_BROKER": env_line.group(1), "EDGESDK_FLEET_STATE": env_line.group(2)})
        assert listed.returncode == 0, listed.stderr
        devices = json.loads(listed.stdout)
        assert [(d["id"], d["online"], d["models"]) for d in devices] == [("demo-1", True, {"digits": "2"})]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
