"""The fuzz run of ``bench/fuzz.py`` in a short form (a live agent process, a live fleet, a real
Mosquitto, a rogue client on every channel), and checks of the harness itself: its hostile paths
stay inside its temporary tree, it never sends a path it did not vet, and it sees damage.

``pytest -s tests/test_fuzz_live.py`` prints the run's table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECONDS = 12.0
SEED = 11


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("edgesdk_bench_fuzz", REPO / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def layout(fuzz):
    lay = fuzz.Layout.make()
    yield lay
    lay.cleanup(keep=False)


def test_hostile_paths_stay_inside_the_tree_and_damage_is_seen(fuzz, layout) -> None:
    paths = layout.hostile_paths()
    assert len(paths) >= 6 and all(len(p) == 64 for p in paths)
    top = os.path.realpath(layout.top)
    for p in paths:  # where the agent's and the fleet's stores join a sha256 (before the hardening)
        for base, suffix in ((layout.agent_state / "transfers", ""), (layout.agent_state / "models", ""),
                             (layout.fleet_state / "bundles", ".edgebundle")):
            resolved = os.path.realpath(os.path.join(base, p + suffix))
            assert os.path.commonpath([top, resolved]) == top, (p, resolved)
    skip = [layout.agent_state, layout.fleet_state]
    before = fuzz.snapshot(layout.top, skip)
    (layout.agent_state / "transfers" / "x").mkdir(parents=True)  # inside a state dir: not a change
    assert fuzz.snapshot_diff(before, fuzz.snapshot(layout.top, skip)) == []
    target = layout.agent_state / "transfers" / paths[0]  # what the install + bad chunk did
    target.mkdir(parents=True, exist_ok=True)
    (target / "0.part").write_bytes(b"x")
    changes = fuzz.snapshot_diff(before, fuzz.snapshot(layout.top, skip))
    assert "created root/sentinel/dir/0.part" in changes and "changed root/sentinel/dir (listing)" in changes
    shutil.rmtree(target)
    changes = fuzz.snapshot_diff(before, fuzz.snapshot(layout.top, skip))
    assert "deleted root/sentinel/dir" in changes and "deleted root/sentinel/dir/inner.txt" in changes


def test_the_generator_sends_only_vetted_paths_and_keeps_phantoms_idle(fuzz, layout) -> None:
    corpus = fuzz.Corpus()
    gen = fuzz.Generator(random.Random(3), layout, corpus, "a" * 64, 1000)
    gen.real_tasks["t" * 32] = fuzz.RealTask("j" * 32, "t" * 32, 2, fuzz.frame(gen.task_header(2, id="t" * 32), b""))
    channels, sent, dropped = set(), 0, 0
    for _ in range(1500):
        for item in gen.next_inputs():
            if not gen.admissible(item):
                dropped += 1
                continue
            sent += 1
            channels.add(item.channel)
            decoded = fuzz.unframe_header(item.payload) if item.payload[:4] == b"ESDK" else \
                fuzz._json_or_none(item.payload)
            assert all(s in gen.vetted for s in fuzz._strings(decoded) if "/" in s), item
            if item.topic.split("/")[3:4] in ([d] for d in fuzz.PHANTOMS) and isinstance(decoded, dict):
                assert decoded.get("type") != "work_request", item
    assert channels == set(fuzz.CHANNELS) - {"local API socket"}
    assert sent > 1000 and dropped > 0  # the filter had work to do
    unsafe = fuzz.Input("agent cmd", "x", "edgesdk/v1/devices/fuzz-dev/cmd",
                        json.dumps({"type": "install", "bundle_sha256": "/etc/" + "x" * 59}).encode())
    assert not gen.admissible(unsafe)


def test_fuzz_run_against_a_live_agent_and_fleet(fuzz, digits_bundle, digits_bundle_v2, signing_keys) -> None:
    bundles = fuzz.Bundles(digits_bundle.path, digits_bundle_v2.path, signing_keys.public)
    report = fuzz.run_fuzz(seconds=SECONDS, seed=SEED, bundles=bundles, rate=120.0)
    print()
    print(report.table())
    totals = {ch: sum(kinds.values()) for ch, kinds in report.inputs.items()}
    assert all(totals[ch] > 0 for ch in fuzz.CHANNELS), totals  # every channel was fuzzed
    assert report.passed, "fuzz checks failed:\n" + "\n".join(f"- {c.name}: {c.detail[:1500]}" for c in report.failures())
