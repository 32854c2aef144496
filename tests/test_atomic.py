import pytest

from mirage_rl.atomic import atomic_directory, atomic_write_text


def test_failed_directory_write_keeps_the_previous_version(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out, "model") as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, "model") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    with atomic_directory(out, "model") as tmp:
        (tmp / "weights").write_text("v2")
    assert (out / "weights").read_text() == "v2"


def test_atomic_write_text_replaces_whole_files(tmp_path):
    p = tmp_path / "report.json"
    atomic_write_text(p, "a")
    atomic_write_text(p, "b")
    assert p.read_text() == "b" and [x.name for x in tmp_path.iterdir()] == ["report.json"]
