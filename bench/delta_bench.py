"""Delta updates: bytes on the wire for version N+1 sent as a delta against N, against the full bundle.

    python bench/delta_bench.py [--epochs 1] [--recipes int8,none] [--json out.json]

Models (built in-process, nothing downloaded): ``keras.applications.MobileNetV2`` with
``weights=None``, ``alpha=0.35``, 96x96x3 inputs, no top, average pooling, plus a Dense(10)
head, trained on scikit-learn's digits scaled up to 96x96x3. Version 1 is that model trained
for ``--epochs``. Version 2 comes three ways:

(a) frozen backbone: the same backbone weights, bit for bit, and a new Dense head trained for
    ``--epochs`` with the backbone frozen (the common transfer-learning update);
(b) fully retrained: version 1 trained ``--epochs`` more, every weight free;
(c) pruned: version 1 through the converter's ``--prune 0.5`` (magnitude pruning, fine-tuned
    ``--epochs``).

Each version goes through ``converter.convert`` (the real conversion, golden pairs and Ed25519
signing) as full int8 and as float32 (``--recipes``). For every (version 1 → version 2) pair of
the same recipe, the fleet's own delta code (:mod:`sdk.delta`) makes a delta with every method
(``zstd-zip``: zstd with version 1 as a raw-content dictionary and a long window, as ``zstd
--patch-from``, on the bundles' inflated forms; ``zstd``: the same on the zip bytes; ``bsdiff4``)
and applies each back (the result must be byte-identical to version 2). "The fleet sends" is
what :class:`fleet.deltas.DeltaPlanner` would choose: the smaller of its methods when at most
``MAX_RATIO`` of the bundle, else the bundle whole.

Bytes on the wire are the framed chunk payloads the fleet publishes (:func:`sdk.protocol.split_bundle`,
``Chunk.to_payload``): the full bundle's is the baseline every delta is a ratio of. Times: making
and applying each method's delta as a ratio of ``zstd-zip``'s, measured in the same run. The machine has 2
cores shared with whatever else runs: times are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SIZE, ALPHA, CLASSES = 96, 0.35, 10


def data(n_train: int = 512, n_calib: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Digits (8x8) scaled up 12x to 96x96 and repeated over 3 channels, in [0, 1]."""
    from converter.digits import load_digits_split

    d = load_digits_split()
    x = np.repeat(np.kron(d.x_train[:n_train, :, :, 0], np.ones((12, 12), np.float32))[..., None], 3, axis=-1)
    return x.astype(np.float32), d.y_train[:n_train].astype(np.int64)


def build(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    backbone = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=ALPHA, include_top=False,
                                              weights=None, pooling="avg")
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Dense(CLASSES, name="head")(backbone(inputs, training=False))
    return keras.Model(inputs, outputs), backbone


def train(model, x, y, epochs: int) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def versions(tmp: Path, x, y, epochs: int) -> dict[str, Path]:
    """The .keras files: v1, frozen (a), retrained (b); (c) is v1 through --prune."""
    import keras

    v1, backbone = build(seed=1)
    train(v1, x, y, epochs)
    v1.save(tmp / "v1.keras")
    before = [w.copy() for w in backbone.get_weights()]

    frozen = keras.models.load_model(tmp / "v1.keras")
    inner = next(layer for layer in frozen.layers if isinstance(layer, keras.Model))
    inner.trainable = False
    keras.utils.set_random_seed(2)
    head = frozen.get_layer("head")
    head.set_weights([np.random.default_rng(2).normal(0, 0.05, w.shape).astype(np.float32) for w in head.get_weights()])
    train(frozen, x, 9 - y, epochs)  # a new task on the same features: relabelled digits
    assert all(np.array_equal(a, b) for a, b in zip(before, inner.get_weights())), "the backbone moved"
    frozen.save(tmp / "frozen.keras")

    retrained = keras.models.load_model(tmp / "v1.keras")
    keras.utils.set_random_seed(3)
    train(retrained, x, y, epochs)
    retrained.save(tmp / "retrained.keras")
    return {"v1": tmp / "v1.keras", "frozen": tmp / "frozen.keras", "retrained": tmp / "retrained.keras"}


def convert(src: Path, out: Path, recipe: str, version: str, key: Path, calib: Path, **extra) -> Path:
    from converter import convert as run

    res = run(src, target="cpu", quantize=recipe, calibration=calib if recipe == "int8" else None,
              eval_data=calib, key=key, output=out, runs=5, warmup=2, version=version, name="mnv2", **extra)
    return res.bundle_path


def wire_bytes(blob: bytes) -> int:
    from sdk import protocol as proto

    return sum(len(c.to_payload()) for c in proto.split_bundle(blob))


def measure(base: bytes, target: bytes, method: str) -> dict[str, float]:
    from sdk import delta

    t0 = time.perf_counter()
    d = delta.make_delta(base, target, method)
    t1 = time.perf_counter()
    out = delta.apply_delta(base, d, method, size=len(target))
    t2 = time.perf_counter()
    assert out == target, f"{method} did not rebuild the bundle"
    return {"bytes": len(d), "wire": wire_bytes(d), "make_s": t1 - t0, "apply_s": t2 - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--recipes", default="int8,none")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from sdk.delta import METHODS
    from sdk.signing import generate_keys

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesdk-delta-") as d:
        tmp = Path(d)
        private, _ = generate_keys(tmp / "keys")
        x, y = data()
        np.savez(tmp / "calib.npz", x=x[:64])
        np.savez(tmp / "train.npz", x=x, y=y)
        files = versions(tmp, x, y, args.epochs)
        for recipe in args.recipes.split(","):
            base = convert(files["v1"], tmp / f"v1-{recipe}.edgebundle", recipe, "1", private, tmp / "calib.npz")
            targets = {
                "(a) frozen backbone, new head": convert(files["frozen"], tmp / f"a-{recipe}.edgebundle", recipe, "2",
                                                         private, tmp / "calib.npz"),
                "(b) fully retrained": convert(files["retrained"], tmp / f"b-{recipe}.edgebundle", recipe, "2", private,
                                               tmp / "calib.npz"),
                "(c) pruned 50 %": convert(files["v1"], tmp / f"c-{recipe}.edgebundle", recipe, "2", private,
                                           tmp / "calib.npz", prune=0.5, train=tmp / "train.npz", epochs=args.epochs),
            }
            old = base.read_bytes()
            for case, path in targets.items():
                new = path.read_bytes()
                row = {"case": case, "recipe": "int8" if recipe == "int8" else "float32", "base_bytes": len(old),
                       "full_bytes": len(new), "full_wire": wire_bytes(new)}
                for method in METHODS:
                    row[method] = measure(old, new, method)
                rows.append(row)
    elapsed = time.perf_counter() - started
    print(f"edgesdk delta_bench — MobileNetV2 alpha {ALPHA} {SIZE}x{SIZE}, {args.epochs} epoch(s) per training, "
          f"{os.cpu_count()} cores, {elapsed:.0f} s\n")
    from fleet.deltas import MAX_RATIO, METHODS as SENT

    base_m = METHODS[0]
    print("| update | recipe | full bundle on the wire (baseline) | "
          + " | ".join(f"{m} delta | {m} / full" for m in METHODS) + " | the fleet sends |")
    print("|---|---|---|" + "---|---|" * len(METHODS) + "---|")
    for r in rows:
        full = r["full_wire"]
        best = min(SENT, key=lambda m: r[m]["wire"])
        sent = (f"{best} delta ({r[best]['wire'] / full:.3f})" if r[best]["bytes"] <= MAX_RATIO * r["full_bytes"]
                else f"full bundle (best delta {r[best]['wire'] / full:.3f} > {MAX_RATIO:g})")
        print(f"| {r['case']} | {r['recipe']} | {full:,} B | "
              + " | ".join(f"{r[m]['wire']:,} B | {r[m]['wire'] / full:.3f}" for m in METHODS) + f" | {sent} |")
    print(f"\n| update | recipe | {base_m} make s (baseline) | "
          + " | ".join(f"{m} make / {base_m}" for m in METHODS[1:])
          + f" | {base_m} apply s (baseline) | " + " | ".join(f"{m} apply / {base_m}" for m in METHODS[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(METHODS) - 1) + "---|" + "---|" * (len(METHODS) - 1))
    for r in rows:
        b = r[base_m]
        print(f"| {r['case']} | {r['recipe']} | {b['make_s']:.3f} | "
              + " | ".join(f"{r[m]['make_s'] / b['make_s']:.2f}x" for m in METHODS[1:])
              + f" | {b['apply_s']:.4f} | " + " | ".join(f"{r[m]['apply_s'] / b['apply_s']:.2f}x" for m in METHODS[1:])
              + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
