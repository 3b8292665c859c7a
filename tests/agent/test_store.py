import json

import pytest

from agent.store import ModelStore
from sdk.errors import InstallError


def test_activate_keeps_previous_and_prunes_older(tmp_path) -> None:
    store = ModelStore(tmp_path)
    for v in ("1", "2", "3"):
        store.stage("m", v, f"bundle {v}".encode())
        store.activate("m", v)
    assert store.active("m") == "3" and store.previous("m") == "2"
    assert store.versions("m") == ["2", "3"]  # 1 pruned
    store.activate("m", "2", previous="3")  # a rollback
    assert (store.active("m"), store.previous("m")) == ("2", "3")
    assert json.loads((tmp_path / "models" / "m" / "active.json").read_text()) == {"version": "2", "previous": "3"}
    assert not list((tmp_path / "models" / "m").glob("*.tmp"))


def test_store_survives_reopen_and_refuses_unsafe_names(tmp_path) -> None:
    store = ModelStore(tmp_path)
    store.stage("m", "1", b"x")
    store.activate("m", "1")
    assert ModelStore(tmp_path).active("m") == "1" and ModelStore(tmp_path).names() == ["m"]
    with pytest.raises(InstallError, match="may only contain"):
        store.stage("../evil", "1", b"x")
    with pytest.raises(InstallError, match="not in the store"):
        store.activate("m", "9")


def test_bundles_are_found_by_sha256_only_among_the_models_own_versions(tmp_path) -> None:
    import hashlib

    store = ModelStore(tmp_path)
    for v in ("1", "2"):
        store.stage("m", v, f"bundle {v}".encode())
        store.activate("m", v)
    sha1 = hashlib.sha256(b"bundle 1").hexdigest()
    assert store.held() == {sha1: ("m", "1"), hashlib.sha256(b"bundle 2").hexdigest(): ("m", "2")}
    assert store.find("m", sha1) == b"bundle 1"
    assert store.find("other", sha1) is None and store.find("m", "0" * 64) is None
    (tmp_path / "models" / "m" / "1" / "bundle.sha256").unlink()  # a store made before the record: hashed again
    assert store.find("m", sha1) == b"bundle 1"
    (tmp_path / "models" / "m" / "1" / "bundle.edgebundle").write_bytes(b"tampered")  # the record lies now
    assert store.find("m", sha1) is None
