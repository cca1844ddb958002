"""Where commands write: several files that replace the old ones all or none (write_together)."""

from __future__ import annotations

import pytest

from ropesp.output_paths import write_together


def _writer(text: str):
    return lambda path: path.write_text(text)


def test_files_written_together_replace_the_old_ones_all_or_none(tmp_path):
    write_together(tmp_path / "d", {"a": _writer("a1"), "index": _writer("i1")})
    assert {p.name: p.read_text() for p in (tmp_path / "d").iterdir()} == {"a": "a1", "index": "i1"}
    for failure in (OSError, KeyboardInterrupt):

        def fail(path, failure=failure):
            path.write_text("half")
            raise failure()

        with pytest.raises(failure):
            write_together(tmp_path / "d", {"a": _writer("a2"), "b": fail, "index": _writer("i2")})
        # the first file was written (as a.part) before the failure: the old one stays, nothing is left
        assert {p.name: p.read_text() for p in (tmp_path / "d").iterdir()} == {"a": "a1", "index": "i1"}
    write_together(tmp_path / "d", {"a": _writer("a3"), "index": _writer("i3")})
    assert (tmp_path / "d" / "a").read_text() == "a3" and (tmp_path / "d" / "index").read_text() == "i3"
