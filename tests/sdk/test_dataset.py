import numpy as np
import pytest
from PIL import Image

from sdk.dataset import InputSpec, load_dataset
from sdk.errors import DataError

SPEC = [InputSpec("x", (1, 8, 8, 1))]


def test_npz_npy_and_limits(tmp_path) -> None:
    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20))
    np.save(tmp_path / "d.npy", x)
    d = load_dataset(tmp_path / "d.npz", SPEC, limit=5)
    assert len(d) == 5 and d.y.tolist() == [0, 1, 2, 3, 4]
    assert load_dataset(tmp_path / "d.npy", SPEC).y is None
    assert d.value_range[0][0] >= 0 and d.value_range[0][1] <= 1


def test_image_folder_with_labelled_subfolders(tmp_path) -> None:
    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / label / f"{i}.png")
    d = load_dataset(tmp_path, SPEC, value_range=(-1.0, 1.0))
    assert d.xs[0].shape == (6, 8, 8, 1) and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.xs[0].min() == pytest.approx(-1.0) and d.xs[0].max() == pytest.approx(1.0)


def test_wrong_shape_names_both_shapes_and_the_fix(tmp_path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"shape \[8, 8\].*expects \[8, 8, 1\].*x\[\.\.\., None\]"):
        load_dataset(tmp_path / "d.npz", SPEC)


def test_other_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "none.npz", SPEC)
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 8, 8, 1)))
    with pytest.raises(DataError, match="expected x"):
        load_dataset(tmp_path / "k.npz", SPEC)
    np.savez(tmp_path / "l.npz", x=np.zeros((2, 8, 8, 1)), y=np.zeros(3))
    with pytest.raises(DataError, match="3 labels for 2 samples"):
        load_dataset(tmp_path / "l.npz", SPEC)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="use a .npz"):
        load_dataset(tmp_path / "d.csv", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path / "empty", SPEC)
