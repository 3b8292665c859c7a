"""[converter] alone: train the digits CNN, save it as Keras 3 .keras, Keras 2 .h5 and a Keras-2-era
SavedModel (with its optimizer), convert each with the real `edgesdk convert`, and write the bundles,
key and test data the agent and fleet smokes use (into the directory given as argv[1])."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
edgesdk = str(Path(sys.executable).with_name("edgesdk"))

from converter.digits import load_digits_split, train_digits_cnn  # noqa: E402
from sdk.signing import generate_keys  # noqa: E402

data = load_digits_split()
np.savez(work / "calib.npz", x=data.x_train[:200])
np.savez(work / "test.npz", x=data.x_test, y=data.y_test)
generate_keys(work / "keys")
model, acc = train_digits_cnn(data, epochs=5)
model.save(work / "digits.keras")

import tf_keras  # noqa: E402  Keras 2, as models trained years ago were saved

tf_keras.utils.set_random_seed(0)
k2 = tf_keras.Sequential([tf_keras.layers.InputLayer(input_shape=(8, 8, 1)),
                          tf_keras.layers.Conv2D(8, 3, activation="relu"), tf_keras.layers.Flatten(),
                          tf_keras.layers.Dense(10, activation="softmax")])
# Keras 2's OptimizerV2 (the default before TF 2.11): its slot variables are saved with the model,
# and TensorFlow can only revive them through tf-keras ('_UserObject' has no attribute 'add_slot')
k2.compile(tf_keras.optimizers.legacy.Adam(), "sparse_categorical_crossentropy")
k2.fit(data.x_train, data.y_train, epochs=1, verbose=0)
k2.save(work / "legacy.h5")
k2.save(work / "legacy_savedmodel", save_format="tf")


def convert(source: str, out: str, *args: str) -> None:
    cmd = [edgesdk, "convert", str(work / source), "--target", "cpu", "--eval", str(work / "test.npz"),
           "--key", str(work / "keys" / "private.pem"), "-o", str(work / out), "--runs", "10", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not (work / out).exists():
        sys.exit(f"converter smoke: {' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    print(f"converter smoke: {source} -> {out} ok")


convert("digits.keras", "digits-1.edgebundle", "--quantize", "int8", "--calibration", str(work / "calib.npz"),
        "--name", "digits")
convert("digits.keras", "digits-2.edgebundle", "--quantize", "dynamic", "--name", "digits", "--model-version", "2")
convert("legacy.h5", "legacy-h5.edgebundle", "--quantize", "dynamic")
convert("legacy_savedmodel", "legacy-sm.edgebundle", "--quantize", "dynamic")
print(f"converter smoke: passed (Keras test accuracy {100 * acc:.1f} %)")
