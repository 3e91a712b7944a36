"""The trainer's options on the libraries' machinery: diffusers' EMAModel (against its formula),
mixed precision with the frozen weights in the weight dtype, 8-bit Adam, trackers, gradient
checkpointing; the noise schedule from the pretrained scheduler; the official objective
(issue 10 item 12) against a literal re-computation; the official configs. CPU, seconds."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from vb_train.config import NOISE_DEFAULTS, TrainConfig, load_config
from vb_train.registry import build_task
from vb_train.tasks import resolve_noise_config
from vb_train.trainer import Trainer, build_optimizer

from tests.toy_task import TASK as TOY

ROOT = Path(__file__).resolve().parents[1]
# SD-1.4's scheduler/scheduler_config.json (the keys that matter here), written out literally
SD14_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "prediction_type": "epsilon"}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision included); tests change it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def toy_cfg(tmp_path, name="run", **kw) -> TrainConfig:
    d = dict(task=TOY, device="cpu", output_dir=str(tmp_path / name), seed=3, max_steps=3, batch_size=4,
             checkpoint_every=3, keep_checkpoints=0, progress=False, lr=1e-3, ema_decay=0.9, cond_dropout=0.25,
             report_to=[], model={"channels": 16, "heads": 1, "frames": 3, "tokens": 8, "image_tokens": 4,
                                  "classes": 3}, data={"num_items": 20})
    d.update(kw)
    return TrainConfig.from_dict(d)


# ---- EMA: diffusers' EMAModel --------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_emamodel_decay_formula(tmp_path, warmup):
    tr = Trainer(toy_cfg(tmp_path, ema_warmup=warmup, ema_decay=0.9))
    seen = []
    step = tr.ema.step

    def record(params):
        seen.append([p.detach().clone() for p in params])
        step(params)
    tr.ema.step = record
    tr.train()
    assert len(seen) == 3
    # update n (1-based): decay 0 for n = 1, then min(0.9, n / (9 + n)) with warm-up, 0.9 without
    shadow = None
    for n, params in enumerate(seen, start=1):
        d = 0.0 if n == 1 else (min(0.9, n / (9 + n)) if warmup else 0.9)
        shadow = params if shadow is None else [d * s + (1 - d) * p for s, p in zip(shadow, params)]
    for (k, _), s, e in zip(tr.named_params, shadow, tr.ema.shadow_params):
        torch.testing.assert_close(e, s, rtol=1e-6, atol=1e-7, msg=k)
    # the export sees the EMA weights, the parameters come back afterwards
    before = [p.detach().clone() for p in tr.params]
    with tr.ema_weights():
        assert all(torch.equal(p, s) for p, s in zip(tr.params, tr.ema.shadow_params))
    assert all(torch.equal(p, b) for p, b in zip(tr.params, before))


# ---- mixed precision, 8-bit Adam, trackers -------------------------------------------------------
def test_bf16_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32(tmp_path):
    tr = Trainer(toy_cfg(tmp_path, mixed_precision="bf16", max_steps=2, checkpoint_every=2))
    trained = {k for k, _ in tr.named_params}
    for k, p in tr.task.named_parameters():
        assert p.dtype == (torch.float32 if k in trained else torch.bfloat16), k
    out = tr.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out["history"])
    tr2 = Trainer(toy_cfg(tmp_path, "keep", mixed_precision="bf16", cast_frozen=False))
    assert all(p.dtype == torch.float32 for p in tr2.task.parameters())


def test_adamw8bit_needs_bitsandbytes(tmp_path, monkeypatch):
    cfg = toy_cfg(tmp_path, optimizer="adamw8bit", weight_decay=0.0, lr=2e-4)
    params = [torch.nn.Parameter(torch.ones(2))]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ValueError, match="optimizer: 'adamw8bit' needs bitsandbytes"):
        build_optimizer(cfg, params)
    made = {}

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, p, **kw):
            made.update(kw)
            super().__init__(p, **kw)
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    assert isinstance(build_optimizer(cfg, params), FakeAdamW8bit)
    assert made == {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="optimizer"):
        toy_cfg(tmp_path, optimizer="lion")


def test_missing_tracker_is_an_error_naming_it(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match="report_to: 'wandb' is not installed"):
        Trainer(toy_cfg(tmp_path, report_to=["wandb"]))


def test_gradient_checkpointing_option(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing: the ToyVideoTask task does not support it"):
        Trainer(toy_cfg(tmp_path, gradient_checkpointing=True))


# ---- noise schedule and prediction type ----------------------------------------------------------
def test_noise_schedule_comes_from_the_pretrained_scheduler_unless_overridden():
    vpred = dict(SD14_SCHEDULER, prediction_type="v_prediction", beta_schedule="linear")
    cfg = TrainConfig(task=TOY)
    assert resolve_noise_config(cfg, vpred) == vpred                  # nothing set: the model's
    assert resolve_noise_config(cfg, None) == NOISE_DEFAULTS           # no pretrained scheduler
    same = cfg.replace(prediction_type="v_prediction")
    assert resolve_noise_config(same, vpred) == vpred                 # set and equal: fine
    eps = cfg.replace(prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"prediction_type: the config says 'epsilon', the pretrained "
                                         r"model's scheduler says 'v_prediction'"):
        resolve_noise_config(eps, vpred)
    assert resolve_noise_config(eps.replace(noise_override=True), vpred)["prediction_type"] == "epsilon"
    assert resolve_noise_config(eps, None)["prediction_type"] == "epsilon"


def test_videobooth_task_trains_a_v_prediction_base_as_v_prediction():
    import vb
    from diffusers import DDPMScheduler

    parts = vb.build_tiny_videobooth("unet")
    parts.scheduler = DDPMScheduler(prediction_type="v_prediction", beta_schedule="linear")
    cfg = TrainConfig(task="videobooth", device="cpu", model={"components": "pretrained"})
    from vb_train.videobooth_task import VideoBoothTask

    task = VideoBoothTask(cfg, components=parts)
    assert task.prediction_type == "v_prediction"
    assert task.noise_scheduler.config.beta_schedule == "linear"
    with pytest.raises(ValueError, match="prediction_type: the config says 'epsilon'"):
        VideoBoothTask(cfg.replace(prediction_type="epsilon"), components=parts)


# ---- the official objective and configs ----------------------------------------------------------
@pytest.fixture(scope="module")
def syn_data(tmp_path_factory):
    pytest.importorskip("open_clip")
    from vb_train.toy.synthetic import generate

    root = tmp_path_factory.mktemp("syn")
    generate(root, 4, seed=0, size=32, num_frames=4, fmt="frames", progress=False)
    return root


def test_official_objective_terms_equal_a_literal_recomputation(syn_data):
    import vb

    cfg = TrainConfig(task="videobooth", device="cpu", seed=0, cond_dropout=0.0, mapper_l1=0.01, text_drift_l1=0.02,
                      data={"root": str(syn_data), "num_frames": 4, "size": 16, "image_size": 32})
    torch.manual_seed(0)
    task = build_task(cfg)
    batch = task.collate([task.build_dataset()[i] for i in range(2)])
    out = task(batch, torch.Generator().manual_seed(1))
    # literal: mean |mapper output|, mean |injected - plain caption embedding| (official train_stage1/2.py)
    with torch.no_grad():
        tokens = task.mapper(task.image_encoder(((batch["image"].float() + 1) / 2)).layer_tokens)
        inj, _ = vb.encode_prompt(task.text_encoder, task.tokenizer, list(batch["caption"]), list(batch["subject"]),
                                  tokens)
        plain, _ = vb.encode_prompt(task.text_encoder, task.tokenizer, list(batch["caption"]))
    assert out["no_subject_span"] == 0
    torch.testing.assert_close(out["mapper_l1"], tokens.abs().mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["text_drift_l1"], (inj - plain).abs().mean(), rtol=1e-6, atol=0)
    assert float(out["text_drift_l1"]) > 0
    torch.testing.assert_close(out["loss"], out["loss_mse"] + 0.01 * out["mapper_l1"] + 0.02 * out["text_drift_l1"])
    out["loss"].backward()  # the regularisers reach the mapper
    assert next(task.mapper.parameters()).grad.abs().sum() > 0


def test_official_configs_match_the_official_recipe():
    s1 = load_config(ROOT / "configs" / "official_stage1.yaml")
    s2 = load_config(ROOT / "configs" / "official_stage2.yaml")
    for c in (s1, s2):
        assert (c.optimizer, c.lr, c.weight_decay, c.max_grad_norm) == ("adamw", 1e-4, 0.0, 0.0)
        assert (c.mapper_l1, c.text_drift_l1, c.seed) == (0.01, 0.01, 3407)
        assert (c.ema_decay, c.ema_warmup) == (0.9999, False)
        assert c.batch_size * c.grad_accum * 8 == 256
        # ADM's linear betas on SD-1.4 (scaled_linear): explicit, so allowed only with the override
        noise = resolve_noise_config(c, SD14_SCHEDULER)
        assert (noise["beta_schedule"], noise["beta_start"], noise["beta_end"], noise["prediction_type"]) == \
            ("linear", 1e-4, 0.02, "epsilon")
        with pytest.raises(ValueError, match="beta_schedule: the config says 'linear'.*'scaled_linear'"):
            resolve_noise_config(c.replace(noise_override=False), SD14_SCHEDULER)
    assert (s1.stage, s1.cond_dropout, s2.stage, s2.cond_dropout, s2.cond_dropout_mode) == (1, 0.0, 2, 0.1, "joint")
    assert "prompt_augment_vae" not in s1.data
    assert s2.data["prompt_augment_vae"]["translate"] == [0.1, 0.1] and s2.data["prompt_augment"]["box_trim"] == 0.2


def test_independent_vae_branch_augmentation(syn_data):
    from vb_train.data import PromptAugment, VideoBoothDataset

    kw = dict(num_frames=4, size=16, image_size=32, seed=0)
    still = PromptAugment(hflip=0.0, degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0))
    flip = PromptAugment(hflip=1.0, degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0))
    one = VideoBoothDataset(syn_data, prompt_augment=still, **kw)[0]
    both = VideoBoothDataset(syn_data, prompt_augment=still, vae_prompt_augment=flip, **kw)[0]
    assert "image_vae" not in one
    assert torch.equal(both["image"], one["image"])  # the CLIP branch's draws are unchanged
    torch.testing.assert_close(both["image_vae"], one["image"].flip(-1), rtol=0, atol=1e-5)
    # random draws: the two branches differ
    rand = VideoBoothDataset(syn_data, vae_prompt_augment=PromptAugment(translate=(0.1, 0.1)), **kw)[1]
    assert not torch.allclose(rand["image"], rand["image_vae"])


def test_dataloader_workers_give_the_same_losses(tmp_path):
    a = Trainer(toy_cfg(tmp_path, "w0", max_steps=2, checkpoint_every=2)).train()
    b = Trainer(toy_cfg(tmp_path, "w2", max_steps=2, checkpoint_every=2, num_workers=2)).train()
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def test_resume_with_gradient_accumulation_is_exact(tmp_path):
    """accelerate's accumulation counter and the data position survive a stop mid-epoch."""
    ref = Trainer(toy_cfg(tmp_path, "ref", max_steps=4, grad_accum=2, checkpoint_every=10)).train()
    cfg = toy_cfg(tmp_path, "stopped", max_steps=4, grad_accum=2, checkpoint_every=10)
    tr = Trainer(cfg)
    tr._stop_agreed = lambda: tr.step == 1  # 2 of the epoch's 5 batches read
    assert tr.train()["status"] == "stopped"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    resumed = Trainer(cfg)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (1, 0, 2)
    out = resumed.train()
    assert [r["loss"] for r in out["history"]] == [r["loss"] for r in ref["history"][1:]]
    assert [(r["epoch"], r["batch_in_epoch"]) for r in out["history"]] == \
        [(r["epoch"], r["batch_in_epoch"]) for r in ref["history"][1:]]


def test_validation_with_given_prompts_and_image_files(syn_data, tmp_path):
    from PIL import Image

    img = __import__("numpy").full((40, 40, 3), 255, "uint8")
    img[10:30, 10:30] = (200, 30, 30)
    Image.fromarray(img).save(tmp_path / "red.png")
    prompts = [{"caption": "a square moving left", "subject": "square", "image": str(tmp_path / "red.png")}]
    cfg = TrainConfig(task="videobooth", device="cpu", seed=0, validation_prompts=prompts, validation_steps=2,
                      data={"root": str(syn_data), "num_frames": 3, "size": 16, "image_size": 32})
    task = build_task(cfg)
    res = task.validate(tmp_path / "val", step=7)
    assert list(res["videos"]) == ["0_square"] and res["videos"]["0_square"].shape == (3, 16, 16, 3)
    assert 0.0 <= res["metrics"]["color_id"] <= 1.0 and (tmp_path / "val" / "0.gif").is_file()
    with pytest.raises(ValueError, match="validation_prompts"):
        TrainConfig(task="videobooth", validation_prompts=[{"caption": "a"}])
    with pytest.raises(FileNotFoundError, match="validation_prompts: no image file"):
        build_task(cfg.replace(validation_prompts=[dict(prompts[0], image="nope.png")])).validate(tmp_path, 1)


def test_videobooth_task_trains_and_validates_in_bf16(syn_data, tmp_path):
    cfg = TrainConfig(task="videobooth", device="cpu", seed=0, stage=2, batch_size=2, max_steps=1, checkpoint_every=1,
                      progress=False, mixed_precision="bf16", report_to=[], validation_steps=2,
                      output_dir=str(tmp_path / "run"), mapper_l1=0.01, text_drift_l1=0.01,
                      data={"root": str(syn_data), "num_frames": 4, "size": 16, "image_size": 32})
    tr = Trainer(cfg)
    assert {p.dtype for p in tr.task.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tr.params} == {torch.float32}
    out = tr.train()
    assert torch.isfinite(torch.tensor(out["history"][0]["loss"]))
    assert sorted(p.name for p in (tmp_path / "run" / "validation" / "step-00000001").iterdir()) == ["0.gif", "1.gif"]


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes(syn_data):
    """VideoBooth task, stage 2: the same loss and gradients with the backbone's activations
    recomputed in the backward, and the recompute really happens (a ResNet block runs twice)."""
    import vb

    if not hasattr(vb.build_tiny_videobooth("unet").backbone, "enable_gradient_checkpointing"):
        pytest.skip("the VideoBoothUNet backbone has no enable_gradient_checkpointing() (issue12's ModelMixin backbone)")
    cfg = TrainConfig(task="videobooth", device="cpu", seed=0, stage=2, cond_dropout=0.0,
                      data={"root": str(syn_data), "num_frames": 4, "size": 16, "image_size": 32})

    def run(checkpointing):
        torch.manual_seed(0)
        task = build_task(cfg)
        named = task.named_trainable_parameters(2)
        task.requires_grad_(False)
        for _, p in named:
            p.requires_grad_(True)
        if checkpointing:
            task.enable_gradient_checkpointing()
        task.set_train_mode(2)
        # the last ResNet block: after trainable layers, so the backward goes through it
        block = [m for m in task.backbone.modules() if type(m).__name__ == "ResnetBlock2D"][-1]
        calls = []
        # a pre-hook: the recompute stops once it has the saved tensors (early stop), before
        # the forward hooks would run
        block.register_forward_pre_hook(lambda *a: calls.append(1))
        batch = task.collate([task.build_dataset()[i] for i in range(2)])
        out = task(batch, torch.Generator().manual_seed(1))
        forward_calls = len(calls)
        out["loss"].backward()
        return out["loss"].detach(), {k: p.grad.clone() for k, p in named}, forward_calls, len(calls)

    loss0, g0, f0, b0 = run(False)
    loss1, g1, f1, b1 = run(True)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    assert (f0, b0) == (f1, f1) and b1 > f1  # recomputed in the backward only when checkpointing


def test_a_checkpoint_of_the_previous_trainer_is_refused_for_resume_but_its_weights_load(tmp_path):
    import json

    from vb_train import checkpoint as ckpt

    cfg = toy_cfg(tmp_path, max_steps=2, checkpoint_every=2)
    Trainer(cfg).train()
    state_file = ckpt.latest_checkpoint(cfg.output_dir) / "state.json"
    state = json.loads(state_file.read_text())
    state["format"] = 1  # as the hand-written trainer wrote it (optimizer.pt, rng/)
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="format-1 checkpoint .* init_from"):
        Trainer(cfg.replace(max_steps=4))
    tr = Trainer(toy_cfg(tmp_path, "next", init_from=cfg.output_dir))
    assert tr.init_source.endswith("step-00000002")


# ---- a pretrained temporal base (AnimateDiff motion adapter) -------------------------------------
def test_motion_adapter_config_builds_videobooth_on_the_motion_unet(tmp_path):
    """model.motion_adapter: the adapter folder is loaded with from_pretrained and VideoBooth is
    installed on UNetMotionModel (spatial attention only); the result equals diffusers' own
    UNetMotionModel with the 'self' schedule and no image prompt."""
    import copy

    from diffusers import MotionAdapter, UNetMotionModel
    from test_vb_model import randomize, tiny_unet

    from vb_train.videobooth_task import build_unet_backbone

    adapter = randomize(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_num_attention_heads=2, motion_norm_num_groups=8,
                                      motion_max_seq_length=8, use_motion_mid_block=False), seed=3)
    adapter.save_pretrained(tmp_path / "adapter")
    unet = randomize(tiny_unet(), seed=2)
    cfg = TrainConfig(task="videobooth", device="cpu", schedule="self",
                      model={"components": "pretrained", "motion_adapter": str(tmp_path / "adapter")})
    net = build_unet_backbone(cfg, copy.deepcopy(unet))
    assert net.install_config["motion"]
    ref_model = UNetMotionModel.from_unet2d(unet, adapter)
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = ref_model(x, 10, encoder_hidden_states=text.repeat(3, 1, 1)).sample
        torch.testing.assert_close(net(x, 10, text), ref, rtol=1e-5, atol=1e-5)
    for key, value in (("temporal", True), ("train_temporal", True)):
        bad = cfg.replace(model={**cfg.model, key: value})
        with pytest.raises(ValueError, match=f"model.{key}"):
            build_unet_backbone(bad, copy.deepcopy(unet))


def test_animatediff_config_parses():
    from vb_train.config import load_config

    cfg = load_config("configs/animatediff_stage2.yaml")
    assert cfg.model["motion_adapter"] and cfg.gradient_checkpointing and "temporal" not in cfg.model
