"""ropesp/start_gc.py: `ropesp generate` holds the cyclic collector off until its first chunk, then
freezes what is alive and collects again; nothing else is held."""

from __future__ import annotations

import gc

import pytest

from ropesp import start_gc
from ropesp.cli import main


@pytest.fixture(autouse=True)
def _collector_on():
    yield
    start_gc.release()
    gc.enable()
    gc.unfreeze()


def test_hold_and_release():
    frozen = gc.get_freeze_count()
    start_gc.hold()
    assert not gc.isenabled() and start_gc.held()
    start_gc.release()
    assert gc.isenabled() and not start_gc.held()
    assert gc.get_freeze_count() > frozen
    start_gc.release()  # idempotent
    assert gc.isenabled()


def test_release_leaves_a_collector_it_did_not_disable_alone():
    gc.disable()
    start_gc.hold()  # already off: not ours
    start_gc.release()
    assert not gc.isenabled()


def test_generate_holds_the_collector_until_its_first_chunk(tmp_path, monkeypatch):
    seen = []
    release = start_gc.release
    monkeypatch.setattr(start_gc, "release", lambda: (seen.append(gc.isenabled()), release()))
    out = tmp_path / "v.mp4"
    assert main(["generate", "--preset", "tiny", "--latent-frames", "6", "--output", str(out)]) == 0
    assert out.exists() and gc.isenabled()
    # the first chunk's release found the collector off; the later ones and main's own found it on
    assert seen[0] is False and all(seen[1:]) and len(seen) == 3


def test_other_commands_leave_the_collector_alone(monkeypatch, capsys):
    monkeypatch.setattr(start_gc, "hold", lambda: pytest.fail("held outside generate"))
    assert main(["bench", "--configs", "bogus", "--device", "cpu"]) == 2  # the command ran and refused
    assert "bogus" in capsys.readouterr().err
    assert gc.isenabled()
