"""A model that needs Select-TF (Flex) or custom ops fails conversion, naming the ops."""

import pytest

from converter import convert
from sdk.errors import UnsupportedOpError


@pytest.fixture(scope="module")
def svd_saved_model(tmp_path_factory):
    import keras
    import tensorflow as tf

    class SingularValues(keras.layers.Layer):
        def call(self, x):
            return tf.linalg.svd(x, compute_uv=False)

    model = keras.Sequential([keras.Input((4, 4)), SingularValues()])
    path = tmp_path_factory.mktemp("svd") / "sm"
    model.export(str(path), verbose=False)
    return path


def test_conversion_fails_naming_the_op(svd_saved_model, tmp_path) -> None:
    with pytest.raises(UnsupportedOpError, match="Svd") as exc:
        convert(svd_saved_model, quantize="none", output=tmp_path / "x.edgebundle")
    assert exc.value.ops == ["Svd"]
    assert "builtin" in str(exc.value)
    assert not (tmp_path / "x.edgebundle").exists()


def test_cli_reports_the_op_in_one_line(svd_saved_model, tmp_path, edgesdk_cli) -> None:
    r = edgesdk_cli("convert", svd_saved_model, "-o", tmp_path / "x.edgebundle")
    assert r.returncode == 4
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Svd" in errors[0]
    assert "Traceback" not in r.stderr
