"""The training loop (vb_train.trainer): steps, stages, condition dropout, atomic checkpoints, exact
resume after a stop and after a kill, config/CLI; the toy task through every attention backend;
a few steps of the real VideoBooth task on a tiny synthetic set. CPU, seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vb_train import checkpoint as ckpt
from vb_train.config import TrainConfig, config_from_args, load_config, normalize_schedule
from vb_train.registry import build_task
from vb_train.trainer import FAULT_ENV, FAULT_EXIT_CODE, EpochBatchSampler, Trainer

from tests.toy_task import TASK as TOY, ToyVideoTask

ROOT = Path(__file__).resolve().parents[1]


def toy_cfg(tmp_path, name="run", **kw) -> TrainConfig:
    d = dict(task=TOY, device="cpu", output_dir=str(tmp_path / name), seed=3, max_steps=6, batch_size=4,
             checkpoint_every=2, keep_checkpoints=0, progress=False, lr=1e-3, lr_scheduler="cosine",
             lr_warmup_steps=2, ema_decay=0.9, cond_dropout=0.25,
             model={"channels": 16, "heads": 1, "frames": 3, "tokens": 8, "image_tokens": 4, "classes": 3},
             data={"num_items": 20})
    d.update(kw)
    return TrainConfig.from_dict(d)


def losses(path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in Path(path, "loss.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


# ---- config ----------------------------------------------------------------------------------
def test_config_yaml_overrides_and_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"task: {TOY}\nlr: 1.0e-4\nmodel: {{channels: 16}}\n")
    cfg = load_config(p, ["lr=3e-4", "model.heads=2", "data.num_items=8", "adam_betas=[0.8,0.9]"],
                      schedule="window2", stage=None)
    assert cfg.lr == 3e-4 and cfg.model == {"channels": 16, "heads": 2} and cfg.data == {"num_items": 8}
    assert cfg.adam_betas == (0.8, 0.9) and cfg.schedule == "window:2" and cfg.stage == 1
    cfg2, args = config_from_args(["--config", str(p), "max_steps=7", "--attn-backend", "sdpa",
                                   "--schedule", "keyframes4", "--stage", "2", "--no-progress"])
    assert (cfg2.max_steps, cfg2.attn_backend, cfg2.schedule, cfg2.stage, cfg2.progress) == \
        (7, "sdpa", "keyframes:4", 2, False)
    assert TrainConfig.from_dict(cfg2.to_dict()) == cfg2
    for bad in ({"lr": 0}, {"stage": 3}, {"schedule": "window"}, {"attn_backend": "cuda"}, {"cond_dropout": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(None, ["learning_rate=1"])
    assert normalize_schedule("window:3+img") == "window:3+img"


# ---- a few steps ---------------------------------------------------------------------------------
def test_few_steps_finite_with_checkpoint_files_and_logs(tmp_path):
    cfg = toy_cfg(tmp_path, max_steps=3, checkpoint_every=2, keep_checkpoints=1, grad_accum=2)
    tr = Trainer(cfg)
    before = {k: p.detach().clone() for k, p in tr.task.named_parameters()}
    out = tr.train()
    assert out["status"] == "done" and out["step"] == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out["history"])
    # grad_accum=2: two micro-batches per step, 20 items / batch 4 = 5 batches per epoch
    assert [(r["epoch"], r["batch_in_epoch"]) for r in out["history"]] == [(0, 2), (0, 4), (1, 1)]
    run = Path(cfg.output_dir)
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step-00000003"]  # keep_checkpoints=1 pruned step 2
    c = run / "checkpoints" / "step-00000003"
    for f in ("trainable.safetensors", "ema.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl",
              "random_states_0.pkl", "config.yaml", "state.json"):
        assert (c / f).is_file(), f
    state = ckpt.load_state(c)
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["stage"]) == (3, 1, 1, 1)
    # only stage-1 parameters moved; EMA lags behind them
    trained = dict(tr.named_params)
    assert set(trained) == set(ckpt.load_tensors(c / "trainable.safetensors"))
    assert any(k.startswith("mapper.") for k in trained) and not any("attn1_" in k for k in trained)
    for k, p in tr.task.named_parameters():
        assert torch.equal(p, before[k]) != (k in trained), k
    ema = ckpt.load_tensors(c / "ema.safetensors")
    assert any(not torch.equal(ema[k], trained[k].detach()) for k in ema)
    assert [s for s, _, _ in losses(run)] == [1, 2, 3]
    assert (run / "loss.csv").read_text().splitlines()[0].startswith("step,epoch,batch_in_epoch,loss,lr")
    assert not list(c.glob("model*.safetensors"))  # frozen weights are not checkpointed
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # the default tracker: tensorboard
    assert json.loads((run / "replicas" / "rank-0.json").read_text())["step"] == 3


def test_stage2_starts_from_stage1_and_trains_attn1(tmp_path):
    s1 = toy_cfg(tmp_path, "s1", max_steps=2)
    Trainer(s1).train()
    s2 = toy_cfg(tmp_path, "s2", stage=2, init_from=s1.output_dir, init_weights="ema", max_steps=2)
    tr = Trainer(s2)
    ema1 = ckpt.load_weights(s1.output_dir, "ema")
    own = dict(tr.task.named_parameters())
    assert all(torch.equal(own[k], v) for k, v in ema1.items())
    names = {k for k, _ in tr.named_params}
    assert set(ema1) < names and {"attn1_to_k_exemplar.weight", "attn1_to_v_new.weight"} <= names
    start = {k: p.detach().clone() for k, p in tr.named_params}
    tr.train()
    assert all(not torch.equal(p, start[k]) for k, p in tr.named_params)
    assert ckpt.load_state(ckpt.latest_checkpoint(s2.output_dir))["init_from"].endswith("step-00000002")
    # a stage-1 checkpoint cannot be resumed as stage 2 (that is what init_from is for)
    with pytest.raises(ValueError, match="stage-1 checkpoint"):
        Trainer(toy_cfg(tmp_path, "s1", stage=2))


def test_condition_dropout_rates_and_null_conditions(tmp_path):
    task = build_task(toy_cfg(tmp_path, cond_dropout=0.1))
    g = torch.Generator().manual_seed(0)
    t, i = task.dropout_masks(20000, g)
    assert torch.equal(t, i) and abs(t.float().mean().item() - 0.1) < 0.01
    task.cfg.cond_dropout_mode = "independent"
    t, i = task.dropout_masks(20000, g)
    assert abs(t.float().mean().item() - 0.1) < 0.01 and abs((t & i).float().mean().item() - 0.01) < 0.004
    batch = task.collate([task.build_dataset()[k] for k in range(3)])
    out = task.drop_conditions(batch, torch.tensor([True, False, False]), torch.tensor([False, True, False]))
    assert out["label"].tolist() == [task.classes, batch["label"][1].item(), batch["label"][2].item()]
    assert torch.equal(out["image"][1], torch.zeros_like(out["image"][1]))  # grey
    assert torch.equal(out["image"][0], batch["image"][0])


# ---- data order ------------------------------------------------------------------------------------
def test_sampler_epochs_and_accelerate_shards():
    from accelerate.data_loader import BatchSamplerShard

    s = EpochBatchSampler(23, 3, world_size=2, seed=5)
    assert s.batches_per_epoch == 3 and len(s) == 6
    e0 = list(s)
    assert len(set(sum(e0, []))) == 18 and all(len(b) == 3 for b in e0)
    s.set_epoch(1)
    assert list(s) != e0  # a new permutation every epoch
    s.set_epoch(0)
    shards = [list(BatchSamplerShard(s, num_processes=2, process_index=r)) for r in (0, 1)]
    assert shards[0] == e0[0::2] and shards[1] == e0[1::2]  # each process its own batches


# ---- exact resume -----------------------------------------------------------------------------------
def test_stop_and_resume_gives_identical_losses(tmp_path):
    ref = Trainer(toy_cfg(tmp_path, "ref")).train()
    cfg = toy_cfg(tmp_path, "stopped")
    tr = Trainer(cfg)
    tr._stop_agreed = lambda: tr.step == 3  # as a SIGTERM handled at the end of step 3 would
    out = tr.train()
    assert out["status"] == "stopped" and out["step"] == 3
    assert ckpt.latest_checkpoint(cfg.output_dir).name == "step-00000003"  # off the checkpoint_every grid
    resumed = Trainer(cfg)
    assert resumed.step == 3
    out2 = resumed.train()
    assert [r["loss"] for r in out2["history"]] == [r["loss"] for r in ref["history"][3:]]
    assert losses(cfg.output_dir) == losses(ref["output_dir"])
    a = ckpt.load_tensors(Path(ref["checkpoint"]) / "ema.safetensors")
    b = ckpt.load_tensors(Path(out2["checkpoint"]) / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_mid_checkpoint_then_resume_gives_identical_losses(tmp_path):
    """A subprocess is killed (os._exit) in the middle of writing the step-4 checkpoint, after
    computing steps 3 and 4. The half-written checkpoint is never picked; the resumed run starts
    from step 2 and reproduces the uninterrupted run's losses for steps 3..6 bit for bit."""
    cfg = toy_cfg(tmp_path, "killed")
    yaml_path = tmp_path / "killed.yaml"
    yaml_path.write_text(cfg.to_yaml())
    env = dict(os.environ, **{FAULT_ENV: "exit_in_save=4", "OMP_NUM_THREADS": str(torch.get_num_threads()),
                              "PYTHONPATH": str(ROOT)})
    proc = subprocess.run([sys.executable, "-m", "vb_train", "--config", str(yaml_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr[-3000:]
    run = Path(cfg.output_dir)
    partial = run / "checkpoints" / ".tmp-step-00000004"
    assert partial.is_dir() and (partial / "optimizer.bin").is_file() and not (partial / "state.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert [s for s, _, _ in losses(run)] == [1, 2, 3, 4]

    ref = Trainer(toy_cfg(tmp_path, "ref")).train()
    tr = Trainer(cfg)
    assert tr.resume_from.name == "step-00000002" and tr.step == 2
    out = tr.train()
    assert not partial.exists()
    assert losses(run) == losses(ref["output_dir"])  # steps 1-2 from the killed run, 3-6 recomputed
    assert [r["loss"] for r in out["history"]] == [r["loss"] for r in ref["history"][2:]]


def test_checkpoint_commit_failure_keeps_previous_and_ignores_partials(tmp_path, monkeypatch):
    cfg = toy_cfg(tmp_path, max_steps=2)
    tr = Trainer(cfg)
    tr.train()
    root = Path(cfg.output_dir) / "checkpoints"
    good = ckpt.latest_checkpoint(root)
    assert good.name == "step-00000002"
    # a crash right before the rename: the temp dir is complete but never becomes step-N
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    tr.step = 3
    with pytest.raises(OSError, match="simulated crash"):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert (root / ".tmp-step-00000003" / "state.json").is_file()
    # a step-N directory without state.json (written by something non-atomic) is ignored too
    (root / "step-00000009").mkdir()
    (root / "step-00000009" / "trainable.safetensors").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(root) == good
    assert Trainer(cfg.replace(max_steps=4)).resume_from == good
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(cfg.replace(resume="never"))
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


# ---- attention backends and schedules through the toy task ------------------------------------------
def test_toy_loss_same_on_every_attention_backend(tmp_path):
    from vb_kernels.api import triton_runs_here

    def loss_of(backend, schedule="videobooth"):
        torch.manual_seed(0)
        task = build_task(toy_cfg(tmp_path, attn_backend=backend, schedule=schedule))
        batch = task.collate([task.build_dataset()[k] for k in range(2)])
        if backend == "flex":  # FlexAttention has no backward on CPU: forward only
            task.requires_grad_(False)
            return task(batch, torch.Generator().manual_seed(1))["loss"].item(), None
        out = task(batch, torch.Generator().manual_seed(1))
        out["loss"].backward()
        return out["loss"].item(), task.attn1_to_k_exemplar.weight.grad.clone()

    backends = ["sdpa", "flex"] + (["triton"] if triton_runs_here(torch.device("cpu")) else [])
    for schedule in ("videobooth", "window:2", "keyframes:2+img"):
        ref, gref = loss_of("reference", schedule)
        for b in backends:
            val, g = loss_of(b, schedule)
            assert abs(val - ref) < 1e-5 * abs(ref), (b, schedule)
            assert g is None or torch.allclose(g, gref, rtol=1e-4, atol=1e-6), (b, schedule)
    with pytest.raises(ValueError, match="no backward on CPU"):
        Trainer(toy_cfg(tmp_path, attn_backend="flex"))
    assert isinstance(build_task(toy_cfg(tmp_path)), ToyVideoTask)


# ---- the real VideoBooth task ------------------------------------------------------------------------
def test_videobooth_task_two_stages_on_synthetic_data(tmp_path):
    pytest.importorskip("open_clip")
    from vb_train.toy.synthetic import generate
    import vb

    data = tmp_path / "syn"
    generate(data, 6, seed=0, size=32, num_frames=4, fmt="frames", progress=False)
    base = dict(task="videobooth", device="cpu", seed=0, batch_size=2, max_steps=2, checkpoint_every=2,
                progress=False, lr=1e-3, cond_dropout=0.5, validation_steps=2,
                data={"root": str(data), "num_frames": 4, "size": 16, "image_size": 32})
    s1 = TrainConfig.from_dict(dict(base, output_dir=str(tmp_path / "s1")))
    out1 = Trainer(s1).train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out1["history"])
    w1 = ckpt.load_weights(s1.output_dir, "params")
    assert any(k.startswith("mapper.") for k in w1) and any("attn2.processor.to_k_new" in k for k in w1)
    assert not any("attn1" in k for k in w1)
    s2 = TrainConfig.from_dict(dict(base, stage=2, init_from=s1.output_dir, output_dir=str(tmp_path / "s2"),
                                    schedule="window2", attn_backend="sdpa"))
    tr2 = Trainer(s2)
    names = {k for k, _ in tr2.named_params}
    assert set(w1) < names and any("attn1.processor.to_k_exemplar" in k for k in names)
    out2 = tr2.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out2["history"])
    # validation at the checkpoint: GIFs, and the metric and videos in tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(p.name for p in (Path(s2.output_dir) / "validation" / "step-00000002").iterdir()) == \
        ["0.gif", "1.gif"]
    ev = EventAccumulator(str(next((Path(s2.output_dir) / "logs").rglob("events.out.tfevents.*")).parent))
    ev.Reload()
    assert {"validation/color_id", "loss", "lr", "grad_norm"} <= set(ev.Tags()["scalars"])
    assert len(ev.Tags()["images"]) == 2  # one strip of frames per validation video
    # the exported adapter loads into a fresh pipeline with the schedule it was trained with
    # (load_adapter refuses another schedule)
    parts = vb.build_tiny_videobooth("unet", schedule="window:2")
    parts.pipeline().load_adapter(out2["export"])
    ema = ckpt.load_weights(s2.output_dir, "ema")
    k = next(k for k in ema if "to_v_exemplar" in k)
    assert torch.equal(dict(parts.backbone.named_parameters())[k[len("backbone."):]], ema[k])


def test_copy_named_checks_names_and_shapes():
    from vb_train.checkpoint import copy_named

    m = torch.nn.BatchNorm1d(3)
    n = copy_named(m, {"weight": torch.full((3,), 2.0), "running_mean": torch.ones(3)}, "src.safetensors")
    assert n == 2 and m.weight.eq(2).all() and m.running_mean.eq(1).all()
    with pytest.raises(ValueError, match=r"src.safetensors has tensors this model does not: \['nope'\]"):
        copy_named(m, {"nope": torch.ones(3)}, "src.safetensors")
    with pytest.raises(ValueError, match=r"src.safetensors: bias has shape \(4,\), the model \(3,\)"):
        copy_named(m, {"bias": torch.ones(4)}, "src.safetensors")
