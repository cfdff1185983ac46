"""Atomic writes: the target holds the old file or the whole new one, never a part, and no temporary is left."""

from __future__ import annotations

import json

import pytest

from datamodules.atomic import write_atomically, write_json_atomically


def test_a_completed_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.json"  # the folder is created
    write_json_atomically(target, {"a": 1})
    write_json_atomically(target, {"a": 2, "b": [1, 2]}, indent=1)
    assert json.loads(target.read_text()) == {"a": 2, "b": [1, 2]} and target.read_text().endswith("\n")
    write_atomically(tmp_path / "blob", lambda f: f.write(b"\x00\x01"), binary=True)
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blob", "report.json", "sub"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "data.tsv"
    target.write_text("old\n")

    def half_then_fail(file):
        file.write("new, but only half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.tsv"]


def test_newline_is_passed_to_text_files(tmp_path):
    write_atomically(tmp_path / "a.txt", lambda f: f.write("x\r\ny\n"), newline="")
    assert (tmp_path / "a.txt").read_bytes() == b"x\r\ny\n"


def test_a_durable_write_syncs_the_content_before_the_rename(tmp_path, monkeypatch):
    import os

    import datamodules.atomic as atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_atomically(tmp_path / "cache.bin", lambda f: f.write(b"\x01" * 10), binary=True, durable=True)
    write_atomically(tmp_path / "small.txt", lambda f: f.write("x"))
    assert events == ["fsync", "replace", "replace"]  # the second, not durable, is only renamed
    assert (tmp_path / "cache.bin").read_bytes() == b"\x01" * 10
