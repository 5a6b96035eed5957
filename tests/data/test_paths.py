from lightning_rlm.data.paths import data_root, resolve_data_path


def test_data_root_from_env(tmp_path, monkeypatch):
    (tmp_path / "x.txt").write_text("hi")
    monkeypatch.setenv("LRLM_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    assert resolve_data_path("x.txt") == tmp_path / "x.txt"
