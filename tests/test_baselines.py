"""Per-subject personalisation baselines (issue 31 item 1, `vb_train.toy.baselines`): Textual
Inversion trains only its new embedding row, DreamBooth-LoRA only LoRA weights with the prior
term on class samples, the CLI's quick run writes its compute fields, bad arguments are named.
Tiny and random."""
from __future__ import annotations

import json

import pytest
import torch

from vb_train.toy import baselines as B


@pytest.fixture(scope="module")
def task():
    """A random text-only toy VideoBooth task (coarse and fine paths off), frozen as the base is."""
    from vb_train.config import TrainConfig
    from vb_train.videobooth_task import VideoBoothTask

    torch.manual_seed(0)
    cfg = TrainConfig.from_dict({"task": "videobooth", "stage": 1, "prediction_type": "v_prediction",
                                 "model": {"coarse_path": False, "fine_path": False}, "data": {"root": "unused"}})
    return VideoBoothTask(cfg).eval().requires_grad_(False)


def _image(seed=0):
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _settings(method, **kw):
    kw = dict(dict(steps=2, batch_size=1, progress=False, class_images=2), **kw)
    return B.BaselineSettings(method, **kw)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_predict_text_only_is_the_task_prediction(task):
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 1, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    caps = ["a square moving left on a grey background", "a square"]
    batch = {"image": torch.zeros(2, 3, 32, 32), "caption": caps, "subject": ["square"] * 2,
             "drop_text": torch.zeros(2, dtype=torch.bool)}
    want = task.predict(noisy, t, batch, torch.Generator().manual_seed(0))
    got = B.predict_text_only(task, task.backbone, noisy, t, *B._encode(task.text_encoder, task.tokenizer, caps))
    torch.testing.assert_close(got, want)


def test_textual_inversion_changes_only_the_new_embedding_row(task):
    before_task = _snapshot(task)
    vocab = len(task.tokenizer)
    r = B.train_textual_inversion(task, _image(), _settings("ti", steps=3), token="<vb0>", init_word="square", size=16)
    te, tid = r["text_encoder"], r["token_id"]
    assert tid == vocab and len(r["tokenizer"]) == vocab + 1 and len(task.tokenizer) == vocab   # a copy
    init = task.tokenizer.encode("square", add_special_tokens=False)[0]
    w = te.get_input_embeddings().weight
    w0 = task.text_encoder.get_input_embeddings().weight
    assert w.shape[0] == w0.shape[0] + 1
    assert torch.equal(w[:-1], w0)                                  # every old row bit-identical
    assert not torch.equal(w[tid], w0[init])                        # the new row (started as "square") moved
    assert torch.equal(r["learned"]["embedding"], w[tid])
    after = dict(te.named_parameters())
    emb_name = next(n for n, p in te.named_parameters() if p is w)
    for n, p in task.text_encoder.named_parameters():
        if n != emb_name:
            assert torch.equal(after[n], p), n                      # the rest of the text encoder
    for n, p in task.named_parameters():
        assert torch.equal(p, before_task[n]), n                    # backbone, VAE, base text encoder
    c = r["compute"]
    assert c["steps"] == 3 and c["cpu_seconds"] > 0 and c["trainable_parameters"] == w.shape[1]
    ids = r["tokenizer"]("a <vb0> moving left")["input_ids"]
    assert tid in ids and len(ids) == 6
    with pytest.raises(ValueError, match="token"):
        B.add_placeholder(r["tokenizer"], te, "<vb0>", "square")
    with pytest.raises(ValueError, match="init_word"):
        B.add_placeholder(task.tokenizer, task.text_encoder, "<vb9>", "a red square")


def test_dreambooth_lora_changes_only_lora_parameters(task):
    before_task = _snapshot(task)
    cx = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    r = B.train_dreambooth_lora(task, _image(), _settings("dreambooth_lora", steps=3), class_word="square",
                                class_x0=cx, size=16)
    bb = r["backbone"]
    named = dict(bb.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora and set(r["learned"]) == lora
    # LoRA on every spatial attn1/attn2 projection the forward uses, none on the temporal layers
    assert any(".attn1.processor.to_k_new.lora_A" in n for n in lora)
    assert any(".attn2.processor.to_v_new.lora_B" in n for n in lora)
    assert any(".attn1.to_q.lora_A" in n for n in lora) and any(".attn2.to_out.0.lora_B" in n for n in lora)
    assert not any("vb_temporal" in n for n in lora)
    base = {n.replace("backbone.", "", 1): p for n, p in before_task.items() if n.startswith("backbone.")}
    for n, p in named.items():
        if n in lora:
            continue
        key = n.replace(".base_layer.", ".")
        assert torch.equal(p, base[key]), n                          # every base weight bit-identical
    assert any(not torch.equal(named[n], torch.zeros_like(named[n])) for n in lora if "lora_B" in n)  # B left 0
    for n, p in task.named_parameters():
        assert torch.equal(p, before_task[n]), n                     # the base task itself untouched
    assert r["compute"]["trainable_parameters"] == sum(named[n].numel() for n in lora)
    assert all(v is not None and v > 0 for v in r["prior_losses"])


def test_dreambooth_prior_term_is_computed_on_the_class_samples_and_weighted(task):
    bb, _ = B.add_lora(task.backbone, 2)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    x0 = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cx = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    it = B._encode(task.text_encoder, task.tokenizer, ["a sks square"])
    ct = B._encode(task.text_encoder, task.tokenizer, ["a square"])
    with torch.no_grad():
        tot1, inst1, prior1 = B.dreambooth_loss(task, bb, x0, it, cx, ct, 1.0, g())
        tot3, inst3, prior3 = B.dreambooth_loss(task, bb, x0, it, cx, ct, 3.0, g())
        _, inst_o, prior_o = B.dreambooth_loss(task, bb, x0, it, cx + 1.0, ct, 1.0, g())
        tot0, inst0, prior0 = B.dreambooth_loss(task, bb, x0, it, cx, ct, 0.0, g())
    torch.testing.assert_close(tot1, inst1 + prior1)
    torch.testing.assert_close(tot3, inst3 + 3.0 * prior3)
    torch.testing.assert_close(prior1, prior3)
    assert float(prior1) > 0 and not torch.allclose(tot1, tot3)
    torch.testing.assert_close(inst_o, inst1)                        # the class samples only move the prior term
    assert not torch.allclose(prior_o, prior1)
    assert prior0 is None and torch.equal(tot0, inst0)
    # and in training: the weight changes what LoRA learns
    cx2 = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    runs = [B.train_dreambooth_lora(task, _image(), _settings("dreambooth_lora", prior_loss_weight=w, lr=1e-2),
                                    class_word="square", class_x0=cx2, size=16)["learned"] for w in (0.0, 5.0)]
    assert any(not torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    with pytest.raises(ValueError, match="class_x0"):
        B.train_dreambooth_lora(task, _image(), _settings("dreambooth_lora"), class_word="square", class_x0=None,
                                size=16)


def test_settings_and_captions_name_bad_values():
    for kw, name in ((dict(method="lora"), "method"), (dict(steps=0), "steps"), (dict(subjects=-1), "subjects"),
                     (dict(lr=0.0), "lr"), (dict(prior_loss_weight=-1.0), "prior_loss_weight"),
                     (dict(identifier="two words"), "identifier")):
        with pytest.raises(ValueError, match=name):
            B.BaselineSettings(**dict(dict(method="ti"), **kw))
    cap = "a square moving left on a grey background"
    assert B.personalised_caption(cap, "square", "ti", "<vb0>") == "a <vb0> moving left on a grey background"
    assert B.personalised_caption(cap, "square", "dreambooth_lora", "sks") == "a sks square moving left on a grey background"
    with pytest.raises(ValueError, match="subject word"):
        B.personalised_caption(cap, "star", "ti", "<vb0>")


@pytest.mark.parametrize("argv, name", [
    (["--method", "lora", "--subjects", "1", "--steps", "2", "--out", "x"], "--method"),
    (["--method", "ti", "--subjects", "0", "--steps", "2", "--out", "x"], "--subjects"),
    (["--method", "ti", "--subjects", "1", "--steps", "0", "--out", "x"], "--steps"),
    (["--method", "ti", "--subjects", "1", "--steps", "2"], "--out"),
    (["--method", "ti", "--subjects", "1", "--steps", "2", "--out", "x", "--lr", "-1"], "--lr"),
    (["--method", "dreambooth_lora", "--subjects", "1", "--steps", "2", "--out", "x", "--prior-loss-weight", "-2"],
     "--prior-loss-weight"),
])
def test_cli_names_bad_arguments(argv, name, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_cli_quick_one_subject_two_steps_writes_the_compute(tmp_path):
    out = tmp_path / "ti"
    assert B.main(["--method", "ti", "--subjects", "1", "--steps", "2", "--out", str(out), "--quick",
                   "--batch-size", "1", "--no-progress"]) == 0
    res = json.loads((out / "baselines_ti.json").read_text())
    assert res["method"] == "ti" and res["quick"] and len(res["subjects"]) == 1
    sub = res["subjects"][0]
    c = sub["compute"]
    assert c["steps"] == 2 and c["cpu_seconds"] > 0 and c["wall_seconds"] > 0 and c["trainable_parameters"] == 32
    assert "<vb0>" in sub["prompts"][0] and sub["token"] == "<vb0>"
    for key in ("order", "order_soft", "color", "frame_change", "motion"):
        assert key in sub["mean"] and key in sub["base_mean"]
    assert len(sub["scores"]) == len(sub["clips"]) == len(sub["base_scores"])
    assert res["base"]["run_dir"].endswith("fine_only-stage1-s0")
    assert (out / "videos_ti.pt").is_file() and (out / "learned_ti.pt").is_file()
    # the base is reused (not retrained) by a second method over the same work folder
    out2 = tmp_path / "db"
    assert B.main(["--method", "dreambooth_lora", "--subjects", "1", "--steps", "2", "--out", str(out2), "--quick",
                   "--batch-size", "1", "--class-images", "2", "--no-progress", "--work", str(out / "base")]) == 0
    res2 = json.loads((out2 / "baselines_dreambooth_lora.json").read_text())
    c2 = res2["subjects"][0]["compute"]
    assert c2["steps"] == 2 and c2["cpu_seconds"] > 0 and "class_images_cpu_seconds_shared" in c2
    assert res2["class_images"]["square"]["n"] == 2
    assert res2["base"]["run_dir"] == res["base"]["run_dir"]
    assert "sks square" in res2["subjects"][0]["prompts"][0]
    with pytest.raises(SystemExit) as e:   # more subjects than the quick toy holds: named
        B.main(["--method", "ti", "--subjects", "99", "--steps", "1", "--out", str(tmp_path / "x"), "--quick",
                "--no-progress", "--work", str(out / "base")])
    assert e.value.code == 2
