"""Config edits keep every byte outside the edited values: flow style, document markers, a value on the line after
its key, CRLF, comments, quoting, dashed keys; a file that cannot be edited safely is one line, untouched."""

from __future__ import annotations

import pytest

from yolosafe.repair import yamledit as configedit

CASES = {
    "comments": ("# top\nbatch: 32   # total\n# between\ngpus: [0, 1]  # two\nargs:\n  lr0: 0.01\n",
                 "# top\nbatch: 16   # total\n# between\ngpus: [0, 1]  # two\nargs:\n  lr0: 0.01\n"
                 "effective_batch: 64\n"),
    "flow": ("{batch: 32, gpus: [0,1],   imgsz: 640}  # flow\n",
             "{batch: 16, gpus: [0,1],   imgsz: 640, effective_batch: 64}  # flow\n"),
    "markers": ("%YAML 1.2\n---\nbatch: 32\nimgsz: 640\n...\n",
                "%YAML 1.2\n---\nbatch: 16\nimgsz: 640\neffective_batch: 64\n...\n"),
    "next line": ("batch:\n    32\neffective-batch: 128\n", "batch:\n    16\neffective-batch: 64\n"),
    "crlf": ("# c\r\nbatch: 32\r\ngpus: [0,1]\r\n", "# c\r\nbatch: 16\r\ngpus: [0,1]\r\neffective_batch: 64\r\n"),
    "quoted": ("batch: \"32\"\nval_batch: '8'\n", "batch: 16\nval_batch: '8'\neffective_batch: 64\n"),
    "no final newline": ("batch: 32", "batch: 16\neffective_batch: 64\n"),
    "indented root": ("  batch: 32\n  imgsz: 64\n", "  batch: 16\n  imgsz: 64\n  effective_batch: 64\n"),
}


@pytest.mark.parametrize("name", CASES)
def test_only_the_edited_values_change(name):
    before, after = CASES[name]
    assert configedit.set_values(before, {"batch": 16, "effective_batch": 64}, name) == after


@pytest.mark.parametrize("text, words", [
    ("batch: [32\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("base: &b 32\nbatch: *b\n", "cannot locate the value of 'batch'"),
    ("batch: !!int 32\n", "cannot locate the value of 'batch'"),
])
def test_what_cannot_be_edited_safely_is_one_line(text, words):
    with pytest.raises(configedit.EditError) as caught:
        configedit.set_values(text, {"batch": 16}, "run.yaml")
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_backup_and_atomic_replace_keep_mode_and_check_first(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"batch: 32\r\n")
    path.chmod(0o640)
    first, second = configedit.backup(path), configedit.backup(path)
    assert first != second and first.read_bytes() == second.read_bytes() == b"batch: 32\r\n"

    def refuse(tmp):
        raise ValueError(f"checked {tmp.name}")

    with pytest.raises(ValueError):
        configedit.replace_atomically(path, b"batch: 16\r\n", check=refuse)
    assert path.read_bytes() == b"batch: 32\r\n" and sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) \
        == []
    configedit.replace_atomically(path, b"batch: 16\r\n", check=lambda tmp: None)
    assert path.read_bytes() == b"batch: 16\r\n" and path.stat().st_mode & 0o777 == 0o640
    path.chmod(0o444)
    assert configedit.read_only(path)
