"""[fleet] alone, against agents from the [agent] environment: a Mosquitto on a free port, two
`edgesdk agent run` processes from argv[2] (the agent venv's bin dir), then the real `edgesdk fleet`
CLI of this environment: devices, a rollout of version 1, a canary rollout of version 2, a batch job.
argv[1]: the directory converter_smoke.py wrote."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

for heavy in ("tensorflow", "keras", "torch", "ai_edge_litert"):
    assert importlib.util.find_spec(heavy) is None, f"the fleet environment must not hold {heavy}"
work, agent_bin = Path(sys.argv[1]), Path(sys.argv[2])
fleet_cli = str(Path(sys.executable).with_name("edgesdk"))

from fleet.broker import EmbeddedBroker  # noqa: E402

with EmbeddedBroker(kind="mosquitto") as broker:
    env = {**os.environ, "EDGESDK_FLEET_BROKER": broker.url, "EDGESDK_FLEET_STATE": str(work / "fleet-state")}
    agents = []
    for i in range(2):
        cfg = work / f"fleet-agent-{i}.toml"
        cfg.write_text(f'device_id = "smoke-{i}"\nbroker_url = "{broker.url}"\nstate_dir = "{work / f"fleet-agent-{i}"}"\n'
                       f'trusted_keys = ["{work / "keys" / "public.pem"}"]\nheartbeat_interval = 1\n')
        agents.append(subprocess.Popen([str(agent_bin / "edgesdk"), "agent", "run", "--config", str(cfg)]))

    def fleet(*args: str) -> str:
        res = subprocess.run([fleet_cli, "fleet", *args], capture_output=True, text=True, env=env, timeout=300)
        if res.returncode != 0:
            sys.exit(f"fleet smoke: edgesdk fleet {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res.stdout

    # PostgreSQL support is part of this extra: psycopg loads, and an unreachable database is one clear line
    res = subprocess.run([fleet_cli, "fleet", "--db", "postgresql://nobody@127.0.0.1:1/none", "devices"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: cannot reach the fleet database"), res.stderr
    try:
        for _ in range(60):
            online = [d for d in json.loads(fleet("devices", "--json")) if d.get("online")]
            if len(online) == 2:
                break
            time.sleep(1)
        assert len(online) == 2, f"agents online: {online}"
        for bundle in ("digits-1.edgebundle", "digits-2.edgebundle"):
            out = fleet("deploy", str(work / bundle), "--devices", "smoke-0,smoke-1", "--canary", "1", "--json")
            assert json.loads(out)["state"] == "SUCCEEDED", out
            print(f"fleet smoke: rollout of {bundle}: SUCCEEDED")
        fleet("run", "digits", "--input", str(work / "test.npz"), "-o", str(work / "results.npz"))
        test, results = np.load(work / "test.npz"), np.load(work / "results.npz")
        outputs = results[results.files[0]]
        accuracy = float(np.mean(np.argmax(outputs, axis=1) == test["y"]))
        assert outputs.shape[0] == len(test["y"]) and accuracy > 0.85, (outputs.shape, accuracy)
        print(f"fleet smoke: job over {len(test['y'])} samples on 2 agents, accuracy {100 * accuracy:.1f} %")
    finally:
        for p in agents:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in agents]
    assert codes == [0, 0], codes
print("fleet smoke: passed")
