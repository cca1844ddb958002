"""The demo trainer on the CPU: a few steps of a small batch, resumed where they stopped, exported as a
checkpoint the normal loader runs; longer videos and wider windows; bad recipes refused by flag."""

from __future__ import annotations

import json

import pytest
import torch

from ropesp.demo.train import TrainConfig, Trainer, export_weights, main
from ropesp.runtime.pipeline import resolve
from ropesp.settings import RunConfig


def _trainer(**recipe) -> Trainer:
    return Trainer(
        TrainConfig(batch=2, warmup=1, log_every=1, time_limit_s=600.0, **recipe), torch.device("cpu")
    )


def test_steps_resume_and_export(tmp_path):
    first = _trainer(steps=2, frames=12, window_chunks=2, window_prob=1.0)
    assert set(first.masks) == {None, 2}
    before = {k: v.clone() for k, v in first.ema.items()}
    first.run(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "train.json").read_text())
    assert meta["step"] == 2 and [r["step"] for r in meta["curve"]] == [1, 2]
    assert meta["recipe"]["frames"] == 12 and all(r["loss"] > 0 for r in meta["curve"])
    assert any(not torch.equal(before[k], first.ema[k]) for k in before)  # the steps moved the weights

    again = _trainer(steps=3, frames=12, window_chunks=2)
    again.load(tmp_path / "s")
    assert again.step == 2
    again.run(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "train.json").read_text())["step"] == 3

    out = export_weights(tmp_path / "s", tmp_path / "w")
    res = resolve(RunConfig.of(checkpoint=str(out), device="cpu"))
    assert res.model == again.model_cfg and not res.random_weights


def test_window_reaches_back_window_chunks():
    trainer = _trainer(frames=12, window_chunks=2)
    ft = trainer.rows * trainer.cols
    noisy_to_clean = trainer.masks[2][12 * ft :, : 12 * ft]  # noisy copy's queries on the clean copy
    chunk_sees = [
        sorted({int(k) // (3 * ft) for k in noisy_to_clean[c * 3 * ft].nonzero()}) for c in range(4)
    ]
    assert chunk_sees == [[], [0], [0, 1], [1, 2]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "10"], "--frames 10: a whole number of 3-frame chunks"),
        (["--frames", "9", "--window-chunks", "3"], "--window-chunks 3: 1 to 2 for 9 frames"),
    ],
)
def test_bad_recipes_name_the_flag(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "s"), "--device", "cpu", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
