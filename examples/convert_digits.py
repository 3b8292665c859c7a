"""A converter-only walk-through (the main job is `edgesdk demo`): train, convert, sign, verify.

Trains a CNN on scikit-learn's bundled digits (no download), then runs what an ML engineer runs:
``edgesdk keys generate`` and ``edgesdk convert --target cpu --quantize auto --max-accuracy-drop 1``
through the Python API, prints the report and verifies the signed bundle.

    python examples/convert_digits.py [--out out/]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="directory for the model, data, keys, bundle and report")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import numpy as np

    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn
    from sdk import Bundle, generate_keys, load_public_key

    print("1/4 training a small CNN on scikit-learn's digits (1,797 real 8x8 images)...", flush=True)
    data = load_digits_split()
    model, accuracy = train_digits_cnn(data, epochs=args.epochs)
    print(f"    test accuracy {100 * accuracy:.2f}%")
    model.save(out / "digits.keras")
    np.savez(out / "calibration.npz", x=data.x_train[:300])
    np.savez(out / "test.npz", x=data.x_test, y=data.y_test)

    print("2/4 generating a signing key...", flush=True)
    keys = out / "keys"
    if not (keys / "private.pem").exists():
        generate_keys(keys)

    print("3/4 converting: --target cpu --quantize auto --max-accuracy-drop 1 ...", flush=True)
    result = convert(
        out / "digits.keras", target="cpu", quantize="auto", max_accuracy_drop=1.0,
        calibration=out / "calibration.npz", eval_data=out / "test.npz", key=keys / "private.pem",
        output=out / "digits.edgebundle", report_dir=out / "report",
    )
    print(result.table())

    print("4/4 verifying the signed bundle...", flush=True)
    b = Bundle.open(result.bundle_path).verify([load_public_key(keys / "public.pem")])
    print(f"OK: {b.manifest.model_id} ({result.bundle_path}, {result.bundle_path.stat().st_size / 1024:.1f} KB) "
          f"verified with key {b.signer_id}; report and chart in {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
