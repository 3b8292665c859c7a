"""[agent] alone: no TensorFlow; install a signed bundle (verify + golden health check), refuse a
tampered one, then a real `edgesdk agent run` process resumes it and serves over its local socket;
the local verbs: `edgesdk agent deploy` of version 2 into it, `predict` and `status`.
argv[1]: the directory converter_smoke.py wrote. Prints the environment's installed size."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

for heavy in ("tensorflow", "keras", "torch"):
    assert importlib.util.find_spec(heavy) is None, f"the agent environment must not hold {heavy}"
work = Path(sys.argv[1])
state = work / "agent-smoke"
cfg = work / "agent-smoke.toml"
sock = state / "agent.sock"
cfg.write_text(f'device_id = "smoke"\nstate_dir = "{state}"\nsocket_path = "{sock}"\n'
               f'trusted_keys = ["{work / "keys" / "public.pem"}"]\n')

from agent.client import AgentClient  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from sdk.errors import EdgeSdkError  # noqa: E402

agent = Agent(load_config(str(cfg))).start(local_api=False)
agent.install(work / "digits-1.edgebundle")
tampered = bytearray((work / "digits-2.edgebundle").read_bytes())
tampered[len(tampered) // 2] ^= 0xFF
try:
    agent.install(bytes(tampered))
    sys.exit("agent smoke: a tampered bundle was installed")
except EdgeSdkError as exc:
    print(f"agent smoke: tampered bundle refused: {str(exc)[:100]}")
agent.stop()

edgesdk = str(Path(sys.executable).with_name("edgesdk"))
proc = subprocess.Popen([edgesdk, "agent", "run", "--config", str(cfg), "--no-mqtt"])
try:
    for _ in range(300):
        if sock.exists():
            break
        time.sleep(0.1)
    test = np.load(work / "test.npz")
    with AgentClient(str(sock)) as client:
        preds = [int(np.argmax(client.predict("digits", [x[None]])[0])) for x in test["x"]]
    accuracy = float(np.mean(np.array(preds) == test["y"]))
    assert accuracy > 0.85, accuracy
    print(f"agent smoke: the agent process served {len(preds)} requests, accuracy {100 * accuracy:.1f} %")
    models = subprocess.run([edgesdk, "agent", "models", "--config", str(cfg), "--json"], capture_output=True, text=True)
    assert models.returncode == 0 and "digits" in models.stdout, models

    def verb(*args: str) -> dict:
        res = subprocess.run([edgesdk, "agent", *args, "--config", str(cfg), "--json"], capture_output=True, text=True)
        assert res.returncode == 0, res
        return json.loads(res.stdout)

    assert verb("deploy", str(work / "digits-2.edgebundle"))["version"] == "2"
    np.save(work / "agent-smoke.npy", test["x"][:20])
    (out,) = verb("predict", "digits", str(work / "agent-smoke.npy"))["outputs"]
    agree = float(np.mean(np.argmax(out["values"], axis=1) == np.array(preds[:20])))
    assert agree >= 0.8, agree  # the same network, quantized otherwise
    status = verb("status")
    assert status["running"] and [(m["name"], m["active"]) for m in status["models"]] == [("digits", "2")], status
    print(f"agent smoke: deployed digits@2 into the running agent; agent predict agrees with version 1 on "
          f"{100 * agree:.0f} % of 20 samples; status {status['last_install']['outcome']}")
finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, "the agent did not stop cleanly on SIGTERM"

site = Path(sysconfig.get_paths()["purelib"])
sizes: dict[str, int] = {}
for f in site.rglob("*"):
    if f.is_file() and not f.is_symlink():
        top = f.relative_to(site).parts[0]
        sizes[top] = sizes.get(top, 0) + f.stat().st_size
biggest = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:4])
print(f"agent smoke: passed; device environment installed size {sum(sizes.values()) / 1e6:.0f} MB ({biggest})")
