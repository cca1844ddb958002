"""The demo trainer on the CPU: a few steps of a small batch, resumed where they stopped, exported as a
checkpoint the normal loader runs; longer videos and wider windows; bad recipes refused by flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import fields

import pytest
import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.train import TrainConfig, Trainer, export_weights, field_docs, main, motion_spec_weights
from ropesp.demo.world import MOTIONS, all_specs
from ropesp.model.wan import LowRankDelta
from ropesp.runtime.pipeline import resolve
from ropesp.settings import RunConfig


def _trainer(**recipe) -> Trainer:
    return Trainer(
        TrainConfig(batch=2, warmup=1, log_every=1, time_limit_s=600.0, **recipe), torch.device("cpu")
    )


def test_steps_resume_and_export(tmp_path):
    first = _trainer(steps=2, frames=12, window_chunks=2, window_prob=1.0)
    before = {k: v.clone() for k, v in first.ema.items()}
    first.run(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "train.json").read_text())
    assert meta["step"] == 2 and [r["step"] for r in meta["curve"]] == [1, 2]
    assert meta["recipe"]["frames"] == 12 and all(r["loss"] > 0 for r in meta["curve"])
    assert any(not torch.equal(before[k], first.ema[k]) for k in before)  # the steps moved the weights

    again = _trainer(steps=4, frames=12, window_chunks=2, stream_prob=1.0, switch_prob=0.5, rollout_prob=0.5)
    again.load(tmp_path / "s")
    assert again.step == 2
    again.run(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "train.json").read_text())
    assert meta["step"] == 4 and meta["recipe"]["stream_prob"] == 1.0
    assert all("loss_stream" in r and r["grad_norm_stream"] > 0 for r in meta["curve"][2:])
    assert all(r["grad_norm"] > 0 and "grad_norm_stream" not in r for r in meta["curve"][:2])

    out = export_weights(tmp_path / "s", tmp_path / "w")
    res = resolve(RunConfig.of(checkpoint=str(out), device="cpu"))
    assert res.model == again.model_cfg and not res.random_weights


def test_anchor_pulls_the_weights_back_to_the_init_and_resumes_with_them(tmp_path):
    """--anchor: after each optimizer step every weight moves lr * anchor of its way back to the --init
    weights; lr * anchor >= 1 keeps them there exactly; a resumed run pulls toward the same weights."""
    start = _trainer(steps=1)
    start.run(tmp_path / "s")
    export_weights(tmp_path / "s", tmp_path / "w")  # fp16: the weights an --init reads
    for anchor, stays in ((1e6, True), (0.0, False)):
        tuned = _trainer(steps=1, anchor=anchor, lr=1e-3)
        tuned.init_from(tmp_path / "w")
        init = {k: v.clone() for k, v in tuned.model.state_dict().items()}
        tuned.train_step(0.0)
        moved = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, init[k])]
        assert (moved == []) is stays, moved
    pulled = _trainer(steps=2, anchor=100.0, lr=1e-3)
    pulled.init_from(tmp_path / "w")
    pulled.run(tmp_path / "a")
    again = _trainer(steps=3, anchor=100.0, lr=1e-3)
    again.load(tmp_path / "a")
    assert again.anchor is not None
    for a, b in zip(again.anchor, pulled.anchor):
        assert torch.equal(a, b)
    unpulled = _trainer(steps=3)  # resumed without --anchor: nothing pulls
    unpulled.load(tmp_path / "a")
    assert unpulled.anchor is None


def test_anchor_on_a_resumed_run_without_anchor_weights_is_named(tmp_path, capsys):
    _trainer(steps=1).run(tmp_path / "s")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "--out",
                str(tmp_path / "s"),
                "--resume",
                str(tmp_path / "s"),
                "--device",
                "cpu",
                "--anchor",
                "10",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--anchor: " in err and "holds no --init weights to pull toward" in err and "Traceback" not in err


def test_an_adapter_run_trains_only_its_deltas_and_ships_them(tmp_path):
    """--adapter-rank: from the shipped model's base weights (its own adapter left out), a step moves
    the deltas alone; the export carries base + deltas, which the runtime loads as stream blocks."""
    trainer = _trainer(steps=2, adapter_rank=2, stream_prob=1.0, lr=1e-2, far_prob=0.0)
    trainer.init_from(default_checkpoint(), base_only=True)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(not v.any() for k, v in start.items() if k.endswith(".up"))  # zero deltas: the base model
    trainer.run(tmp_path / "s")
    moved = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith("stream_adapter.") for k in moved)
    trained = {p for p in trainer.model.parameters() if p.requires_grad}
    deltas = [m for m in trainer.model.modules() if isinstance(m, LowRankDelta)]
    assert trained == {p for d in deltas for p in (d.down, d.up)}
    res = resolve(RunConfig.of(checkpoint=str(export_weights(tmp_path / "s", tmp_path / "w")), device="cpu"))
    assert (res.model.stream_rank, res.model.stream_from_frame) == (2, 9)


def test_an_adapter_grows_into_a_higher_rank_as_the_same_function():
    """--init of a rank-64 adapter into a rank-96 recipe: every delta up @ down as before (the new rows of
    down drawn, the new columns of up zero), so training goes on from the same model with more rank."""
    small, big = (_trainer(adapter_rank=r, stream_prob=1.0, adapter_from=3) for r in (64, 96))
    for trainer in (small, big):
        trainer.init_from(default_checkpoint())
    pairs = list(
        zip(
            (m for m in small.model.modules() if isinstance(m, LowRankDelta)),
            (m for m in big.model.modules() if isinstance(m, LowRankDelta)),
            strict=True,
        )
    )
    assert pairs and all(b.down.shape[0] == 96 and s.down.shape[0] == 64 for s, b in pairs)
    for s, b in pairs:
        torch.testing.assert_close(b.delta(), s.delta(), rtol=1e-5, atol=1e-6)
        assert b.up[:, 64:].abs().max() == 0 and b.down[64:].abs().max() > 0
    base = [k for k in small.model.state_dict() if not k.startswith("stream_adapter.")]
    assert all(torch.equal(small.model.state_dict()[k], big.model.state_dict()[k]) for k in base)
    assert big.ema["stream_adapter.0.ffn_0.down"].shape[0] == 96


def test_a_state_of_another_model_is_refused_by_resume(tmp_path, capsys):
    """--resume of a state whose weights do not fit the recipe's model (another adapter rank, or none):
    one line naming the flag, nothing written."""
    _trainer(steps=1, adapter_rank=2, stream_prob=1.0).run(tmp_path / "s")
    for recipe in (["--adapter-rank", "3", "--stream-prob", "1"], []):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(tmp_path / "o"), "--resume", str(tmp_path / "s"), "--device", "cpu", *recipe])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--resume {tmp_path / 's'}: its state does not fit" in err, err
        assert "Traceback" not in err and not (tmp_path / "o").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(tmp_path / "s"), "--export", str(tmp_path / "a-file" / "w")])
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and f"--export {tmp_path / 'a-file' / 'w'}: {tmp_path / 'a-file'} is a file" in err
    )


def test_schedule_spans_resumed_runs():
    """--schedule: the cosine runs over the training seconds of every run, resumed ones too."""
    trainer, own = _trainer(schedule_s=100.0, lr=1.0, lr_floor=0.0), _trainer(lr=1.0, lr_floor=0.0)
    trainer.step = own.step = 5  # past the warm-up
    assert trainer.lr_at(50.0) == pytest.approx(0.5)
    trainer.elapsed_before = 50.0  # a resumed run, 50 s trained before
    assert trainer.lr_at(0.0) == pytest.approx(0.5) and trainer.lr_at(50.0) == pytest.approx(0.0)
    assert own.lr_at(300.0) == pytest.approx(0.5)  # without --schedule: its own --time-limit of 600 s


def test_video_batches_see_the_window_back_window_chunks():
    trainer = _trainer(frames=12, window_chunks=2, window_prob=1.0)
    layout = trainer.video_batch().layout
    noisy_sees = [s for s in layout.sees[layout.clean :]]
    own = [layout.clean + c for c in range(4)]
    assert noisy_sees == [(own[0],), (0, own[1]), (0, 1, own[2]), (1, 2, own[3])]


def test_stream_batches_hold_the_world_far_into_the_stream():
    trainer = _trainer(stream_prob=1.0, far_prob=1.0, stream_windows="9/3", horizon=120)
    batch = trainer.stream_batch()
    first = batch.chunks[:, 1]
    assert batch.chunks[:, 0].eq(0).all() and (first >= 2).all()  # the sink, then the run
    assert (batch.chunks[:, -1] < 40).all() and torch.equal(
        batch.chunks[:, 1:].diff(dim=1), torch.ones(2, 4, dtype=torch.long)
    )
    assert torch.equal(batch.x0, batch.clean[:, -9:])  # the world's own chunks are the targets
    assert batch.noisy.shape == batch.x0.shape and batch.t.shape == (2, 9)


def test_switch_batches_start_the_new_world_at_the_switch():
    trainer = _trainer(stream_prob=1.0, far_prob=1.0, switch_prob=1.0, stream_windows="6/0")
    batch = trainer.stream_batch()
    other, slot = batch.switch
    assert slot >= batch.layout.clean - batch.layout.noisy and other.shape == batch.prompts.shape
    # from the switch on the clean chunks are the new world's first frames, whatever the stream chunk
    assert not torch.equal(batch.clean[:, slot * 3 : slot * 3 + 3], batch.clean[:, slot * 3 - 3 : slot * 3])


def test_own_context_replaces_only_chunks_with_a_whole_window():
    trainer = _trainer(stream_prob=1.0, far_prob=1.0, rollout_prob=1.0, stream_windows="12/3")
    world = _trainer(stream_prob=1.0, far_prob=1.0, rollout_prob=0.0, stream_windows="12/3").stream_batch()
    batch = trainer.stream_batch()  # the same draws up to the rollout
    assert torch.equal(batch.x0, world.x0)
    same = [
        torch.equal(batch.clean[:, 3 * s : 3 * s + 3], world.clean[:, 3 * s : 3 * s + 3]) for s in range(6)
    ]
    assert same == [True, True, True, False, False, False]  # the sink and two warm chunks stay the world's


def test_stream_weight_scales_a_stream_batchs_gradient_not_its_reported_loss(monkeypatch):
    # the gradient before clipping: a stream batch's norm is often above the clip (why the weight exists)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: None)
    grads, losses = [], []
    for weight in (1.0, 0.25):
        torch.manual_seed(0)
        trainer = _trainer(stream_prob=1.0, stream_weight=weight, ema=0.0)
        trainer.opt.step = lambda: None  # keep the weights: only the gradient is compared
        loss, _, _, stream = trainer.train_step(0.0)
        assert stream
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert losses[0] == losses[1]
    torch.testing.assert_close(grads[1], grads[0] * 0.25, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "10"], "--frames 10: a whole number of 3-frame chunks"),
        (["--frames", "9", "--window-chunks", "3"], "--window-chunks 3: 1 to 2 for 9 frames"),
        (["--stream-windows", "9/2"], "--stream-windows 9/2: the sink must be 0 or one 3-frame chunk"),
        (["--horizon", "12"], "--horizon 12: at least"),
        (["--stream-weight", "0"], "--stream-weight 0.0: a loss weight above 0"),
        (["--anchor", "-1"], "--anchor -1.0: a pull >= 0"),
        (["--anchor", "100"], "--anchor pulls toward the --init weights: give --init DIR"),
        (["--schedule", "-5"], "--schedule -5.0: training seconds >= 0"),
        (["--step-weights", "1,1,3"], "--step-weights 1,1,3: 4 weights >= 0, one per sampler step"),
        (["--step-weights", "1,x,1,1"], "--step-weights 1,x,1,1: 4 weights >= 0, one per sampler step"),
        (["--motion-weights", "1,2,1"], "--motion-weights 1,2,1: 4 weights >= 0, one per motion (moving,"),
        (["--motion-weights", "1,x,1,1"], "--motion-weights 1,x,1,1: 4 weights >= 0"),
        (["--motion-weights", "0,0,0,0"], "--motion-weights 0,0,0,0: 4 weights >= 0"),
        (["--adapter-rank", "4"], "--adapter-rank 4 learns from stream batches only"),
        (["--adapter-rank", "-1"], "--adapter-rank -1 / --adapter-from 9: a rank >= 0"),
        (["--adapter-rank", "4", "--stream-prob", "1"], "give them with --init DIR"),
        (["--init", str(default_checkpoint())], "holds a stream adapter: train it on with --adapter-rank"),
        (
            ["--init", str(default_checkpoint()), "--adapter-rank", "5", "--stream-prob", "1"],
            f"--init {default_checkpoint()}: size mismatch for stream_adapter.",
        ),
        (
            ["--init", "/no/such/ropesp-dir"],
            "--init /no/such/ropesp-dir: no diffusion_pytorch_model.safetensors",
        ),
        (["--resume", "/no/such/ropesp-dir"], "--resume /no/such/ropesp-dir: not a training state"),
        (["--batch", "0"], "--batch 0: must be >= 1"),
        (["--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--lr", "nan"], "--lr nan: must be > 0"),
        (["--far-prob", "1.5"], "--far-prob 1.5: must be in [0, 1]"),
        (["--ema", "2"], "--ema 2.0: must be in [0, 1]"),
        (["--time-limit", "0"], "--time-limit 0.0: must be > 0"),
        (["--log-every", "0"], "--log-every 0: must be >= 1"),
        (["--edge-weight", "0"], "--edge-weight 0.0: must be > 0"),
        (
            ["--resume", "/no/such/ropesp-dir", "--export", "/no/such/out"],
            "(no state_ema.safetensors, train.json)",
        ),
    ],
)
def test_bad_recipes_name_the_flag(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "s"), "--device", "cpu", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_an_out_path_under_a_file_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(blocker / "s"), "--device", "cpu"])
    assert exc.value.code == 2
    assert f"--out {blocker / 's'}: {blocker} is a file, not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_a_compile_that_fails_is_one_line_naming_the_flag(tmp_path):
    """--compile where torch.compile cannot build (here: no C++ compiler for Inductor's CPU kernels) is one
    line naming the flag, exit 1, no traceback, no half-written state."""
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler")}
    out = tmp_path / "s"
    args = ["--out", str(out), "--compile", "--batch", "1", "--steps", "1", "--device", "cpu"]
    r = subprocess.run(
        [sys.executable, "-m", "ropesp.demo.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: --compile: torch.compile failed (" in r.stderr and "train without --compile" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "--device 'tpu' is not a device: use cpu, cuda or cuda:N"),
        ("cuda:99", "--device cuda:99: this machine has"),
    ],
)
def test_a_device_that_is_not_here_is_named(tmp_path, capsys, device, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "s"), "--device", device])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_motion_weights_set_each_class_share_of_the_stream_prompts():
    specs = all_specs()
    uniform = motion_spec_weights(specs, "")
    assert torch.equal(uniform, torch.ones(len(specs)))  # the shipped runs' draw: bouncing 1 prompt in 13
    weights = motion_spec_weights(specs, "1,2,1,0")
    draws = torch.multinomial(weights, 40_000, replacement=True, generator=torch.Generator().manual_seed(0))
    drawn = Counter(specs[int(i)].motion for i in draws)
    for motion, share in zip(MOTIONS, (0.25, 0.5, 0.25, 0.0)):
        assert abs(drawn[motion] / 40_000 - share) < 0.01, motion
    assert {specs[int(i)].count for i in draws} == {1, 2, 3}  # within a class every prompt stays in play


def test_every_recipe_field_has_its_help_line(capsys):
    docs = field_docs(TrainConfig)
    assert [f.name for f in fields(TrainConfig) if f.name not in docs] == ["preset"]  # not a flag
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--stream-prob STREAM_PROB Fraction of batches cut from long streams" in out
    assert (
        "--time-limit TIME_LIMIT_S Stop and save after this much training time (seconds). (default: 270.0)"
        in out
    )


def test_forgetting_probe_script(tmp_path, monkeypatch):
    """scripts/forgetting_probe.py: a recipe's step from the shipped weights, held-out losses before and
    after; a --recipe key that is no TrainConfig field is named."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "forgetting_probe.py"
    out = tmp_path / "probe.json"
    run = [sys.executable, str(script), "--steps", "1", "--batch", "1", "--threads", "2"]
    subprocess.run([*run, "--recipe", "stream_prob=1.0,stream_weight=0.5", "--json", str(out)], check=True)
    res = json.loads(out.read_text())
    assert res["recipe"]["stream_weight"] == 0.5 and res["recipe"]["stream_prob"] == 1.0 and res["steps"] == 1
    assert all(x > 0 for x in res["video_loss"] + res["stream_loss"])
    assert res["video_loss"][0] != res["video_loss"][1]  # the steps moved the weights
    for per_chunk, loss in zip(res["video_loss_per_chunk"], res["video_loss"], strict=True):
        assert len(per_chunk) == 3 and abs(sum(per_chunk) / 3 - loss) < 1e-5  # 9 frames: 3 chunks
    subprocess.run([*run, "--adapter", "4", "--json", str(out)], check=True)
    res = json.loads(
        out.read_text()
    )  # only the adapter learns, on stream batches; short videos are scored without it
    assert res["adapter_rank"] == 4 and res["recipe"]["stream_prob"] == 1.0
    assert res["video_loss"][0] == res["video_loss"][1] and res["stream_loss"][0] != res["stream_loss"][1]
    bad = subprocess.run([*run, "--recipe", "stream_wieght=0.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--recipe 'stream_wieght=0.5': no TrainConfig field" in bad.stderr
    assert "Traceback" not in bad.stderr
    sys.path.insert(0, str(script.parent))  # the other refusals in this process: the same exits, no start-up
    try:
        probe = __import__("forgetting_probe")
    finally:
        sys.path.remove(str(script.parent))
    threads = str(torch.get_num_threads())
    for args, message in (
        (["--recipe", "lr=fast"], "--recipe 'lr=fast': lr takes a float"),
        (["--recipe", "stream_weight=0"], "--recipe: --stream-weight 0.0: a loss weight above 0"),
        (["--stream-motions", "moving,flying"], "--stream-motions moving,flying: choose from"),
        (["--adapter", "-2"], "--adapter -2: a rank >= 1"),
    ):
        monkeypatch.setattr(sys, "argv", ["forgetting_probe.py", "--steps", "1", "--threads", threads, *args])
        with pytest.raises(SystemExit) as exc:
            probe.main()
        assert message in str(exc.value.code), args


def test_ctrl_c_saves_the_run_and_a_failed_save_keeps_the_state_before(tmp_path, capsys, monkeypatch):
    """Ctrl-C during training ends the run as its time limit would (saved, resumable); a save that fails
    midway (a full disk) leaves the earlier state whole, and the CLI says so in one line, exit 1."""
    import ropesp.demo.train as train

    trainer = _trainer(steps=5)
    step = trainer.train_step
    calls = []

    def interrupted(elapsed):
        calls.append(elapsed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(elapsed)

    trainer.train_step = interrupted
    trainer.run(tmp_path / "s")
    assert "interrupted: saving step 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "train.json").read_text())["step"] == 1
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}

    real_save = train.save_file

    def disk_full(tensors, path, *args, **kwargs):
        if "adam" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(train, "save_file", disk_full)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "s"), "--resume", str(tmp_path / "s"), "--device", "cpu", "--batch", "2",
              "--steps", "2", "--warmup", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert f"--out {tmp_path / 's'}: the training state could not be saved" in err and "No space left" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"stream_prob": 1.0, "switch_prob": 1.0},
        {"stream_prob": 1.0, "switch_prob": 1.0, "adapter_rank": 64, "adapter_from": 3},
    ],
    ids=["videos", "streams", "adapter"],
)
def test_the_compiled_training_forward_is_the_eager_one(recipe):
    """`--compile` trains the same function: one batch's loss and gradients through torch.compile match
    eager's under the trainer's bf16 autocast (bf16's 8-bit mantissa over 4 blocks: a few 1e-3 of the
    loss, gradients within 5 % of their norm), on short videos, stream batches with a prompt switch, and
    the shipped weights' stream adapter (its gates set per slot inside the compiled forward). On the CPU in
    fp32 the adapter's case agreed to 5e-6 of the gradient's norm (not a test: a minute of compiling)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(batch=8, ema=0.0, rollout_prob=0.0, **recipe)
        trainer = Trainer(cfg, torch.device("cuda"), compiled=compiled)
        if cfg.adapter_rank:
            trainer.init_from(default_checkpoint())
        trainer.opt.step = lambda: None
        loss, _, _, stream = trainer.train_step(0.0)
        assert stream == bool(cfg.stream_prob)
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((float(loss.detach()), grad))
    (loss_e, grad_e), (loss_c, grad_c) = results
    assert loss_e > 0 and abs(loss_c - loss_e) <= 5e-3 * loss_e
    assert float((grad_c - grad_e).norm()) <= 0.05 * float(grad_e.norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_compiled_rollouts_are_the_eager_ones():
    """`--compile` also draws the model's own context (the rollouts' 4-step sampling, no grad) through
    the compiled forward: the same context as eager's within bf16 over four sampling steps (relative L2
    <= 0.05; on the CPU in fp32 they agreed to 3e-7)."""
    contexts = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(batch=8, stream_prob=1.0, rollout_prob=1.0, adapter_rank=64, adapter_from=3)
        trainer = Trainer(cfg, torch.device("cuda"), compiled=compiled)
        trainer.init_from(default_checkpoint())
        batch, stream = trainer.draw()
        assert stream
        contexts.append(batch.clean.float())
    eager, compiled = contexts
    assert float((compiled - eager).norm()) <= 0.05 * float(eager.norm())


def test_a_wider_deeper_demo_model_trains_exports_and_runs_as_the_demo_model(tmp_path, capsys):
    """--dim/--num-layers: a larger demo model (the capacity the diagonal scenes ask for, bench/RESULTS.md
    thirtieth session) is trained, exported and then run by the runtime as the demo model: its prompts
    through the demo encoder, at the demo's 24 x 24 latents and 9 frames; a width that splits no head is
    refused by flag, and shipped weights of another size by --init."""
    import ropesp
    from ropesp.demo import is_demo_model

    trainer = _trainer(steps=1, dim=224, num_layers=5)
    cfg = trainer.model_cfg
    assert (cfg.dim, cfg.num_heads, cfg.ffn_dim, len(trainer.model.blocks)) == (224, 7, 896, 5)
    trainer.run(tmp_path / "s")
    out = export_weights(tmp_path / "s", tmp_path / "w")
    res = resolve(RunConfig.of(checkpoint=str(out), device="cpu"))
    assert res.model == cfg and is_demo_model(res.model) and not res.random_weights
    assert (res.geometry.latent_height, res.geometry.latent_width, res.latent_frames) == (24, 24, 9)
    with ropesp.Pipeline(checkpoint=str(out), device="cpu", decoder="none") as pipe:
        video = pipe.generate("two blue discs bouncing", frames=9)
    assert video.latents.shape == (1, 3, 16, 24, 24) and torch.isfinite(video.latents).all()

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--dim", "200", "--steps", "1"])
    assert "--dim 200: a multiple of the model's head width 32" in capsys.readouterr().err
    for flags, message in (
        (["--num-layers", "6"], "holds a stream adapter: train it on with --adapter-rank"),
        (
            ["--dim", "256", "--init-base-only"],
            "is a model of dim 192, this recipe's is dim 256: pass --dim 192",
        ),
    ):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), "--init", str(default_checkpoint()), *flags])
        assert message in capsys.readouterr().err
    shallower = ["--num-layers", "3", "--init", str(default_checkpoint()), "--init-base-only"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), *shallower])
    assert "has 4 blocks, more than this recipe's model (demo, dim 192, 3 layers): pass --num-layers 4" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("adapter", [True, False], ids=["adapter", "whole-model"])
def test_a_deeper_model_grows_from_the_shipped_weights_as_the_same_function(adapter, tmp_path):
    """--init from the shipped 4 blocks into --num-layers 6: the 2 added blocks pass their input on bit for
    bit (their out projections zero), so the grown model's flow equals the shipped one's, and so do the
    runtime's latents from its export (a 6-block model with a stream adapter); one step then moves what
    trains in them (the adapter's deltas, or the whole blocks)."""
    from ropesp.demo.evaluate import generate_latents
    from ropesp.demo.segments import segment_flow
    from ropesp.runtime.pipeline import build_session

    recipe = dict(stream_prob=1.0, switch_prob=1.0, rollout_prob=0.0, ema=0.0)
    if adapter:
        recipe.update(adapter_rank=64, adapter_from=3)
    base, deep = _trainer(**recipe), _trainer(num_layers=6, **recipe)
    base.init_from(default_checkpoint(), base_only=not adapter)
    deep.init_from(default_checkpoint(), base_only=not adapter)
    assert deep.init_info["grown_from_layers"] == "4" and "grown_from_layers" not in base.init_info
    b = base.stream_batch()
    with torch.no_grad():
        flows = [
            segment_flow(t.model, b.clean, b.noisy, b.t, b.prompts, b.layout, b.chunks, b.switch, t.gates)
            for t in (base, deep)
        ]
    assert torch.equal(flows[0], flows[1])
    if adapter:
        deep.save(tmp_path / "s")
        grown = export_weights(tmp_path / "s", tmp_path / "w")
        pairs = [("two white squares bouncing", 3)]
        latents = [
            generate_latents(build_session(RunConfig.of(checkpoint=str(c), device="cpu", frames=21)), pairs)[
                0
            ]
            for c in (default_checkpoint(), grown)
        ]
        assert latents[0].shape[1] == 6 and torch.equal(latents[0], latents[1])  # frames 3-5: the adapter's
    added = deep.model.stream_adapter[5] if adapter else deep.model.blocks[5]
    before = {n: p.detach().clone() for n, p in added.named_parameters()}
    deep.train_step(0.0)
    assert any(not torch.equal(before[n], p) for n, p in added.named_parameters())
