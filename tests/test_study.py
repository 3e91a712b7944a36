"""The fine-path study (issue 21): the exemplar projections' stage-2 start, the swapped prompt and
the order-blind coarse input on the tensor the loader feeds, the oracle's tokens, the order
scores, the flip-loss gap, IP-Adapter-Plus, and a quick end-to-end gate. Tiny and random."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vb_train.toy import synthetic


def _task(stage=2, **model):
    from vb_train.config import TrainConfig
    from vb_train.videobooth_task import VideoBoothTask

    cfg = TrainConfig.from_dict({"task": "videobooth", "stage": stage, "model": dict(model),
                                 "data": {"root": "unused"}})
    return VideoBoothTask(cfg)


# ---- exemplar projections ------------------------------------------------------------------------
def test_stage2_start_clones_the_exemplar_projections_from_the_trained_attn1_kv():
    task = _task()
    procs = task.backbone.attn1_processors()
    with torch.no_grad():   # stand in for what stage 1 trained
        for p in procs:
            p.to_k_new.weight.add_(0.5)
            p.to_v_new.weight.mul_(-1)
    assert not torch.equal(procs[0].to_k_exemplar.weight, procs[0].to_k_new.weight)
    task.after_init_from(set())
    assert task.exemplars_cloned == 2 * len(procs)
    for p in procs:
        assert torch.equal(p.to_k_exemplar.weight, p.to_k_new.weight)
        assert torch.equal(p.to_v_exemplar.bias if p.to_v_exemplar.bias is not None else p.to_v_exemplar.weight,
                           p.to_v_new.bias if p.to_v_new.bias is not None else p.to_v_new.weight)
        assert p.to_k_exemplar.weight.data_ptr() != p.to_k_new.weight.data_ptr()   # copies, not shared
    # init weights that hold the exemplars (a run from a stage-2 run) keep them
    task2 = _task()
    before = task2.backbone.attn1_processors()[0].to_k_exemplar.weight.clone()
    with torch.no_grad():
        task2.backbone.attn1_processors()[0].to_k_new.weight.add_(1.0)
    names = {n for n, _ in task2.named_parameters() if "exemplar" in n}
    task2.after_init_from(names)
    assert task2.exemplars_cloned == 0
    assert torch.equal(task2.backbone.attn1_processors()[0].to_k_exemplar.weight, before)
    # the old behaviour on request, and never in stage 1
    for t in (_task(exemplar_init="construction"), _task(stage=1)):
        t.after_init_from(set())
        assert t.exemplars_cloned == 0
    with pytest.raises(ValueError, match="model.exemplar_init"):
        _task(exemplar_init="nope")


# ---- the swapped prompt and the coarse input ---------------------------------------------------
def _two_tone_set(tmp_path, colour):
    root = tmp_path / colour.replace("/", "_")
    synthetic.generate(root, 1, seed=3, identities=[("square", synthetic.TWO_TONE, colour)], size=48,
                       num_frames=4, fmt="frames", two_tone_side=32, progress=False)
    return root


def test_swap_two_tone_exchanges_the_two_colours_pixel_for_pixel():
    c = synthetic.render_clip(np.random.default_rng(0), ("square", synthetic.TWO_TONE, "red/blue"), size=48,
                              num_frames=2, two_tone_side=32)
    f, m = c["frames"][0], c["mask0"]
    out = synthetic.swap_two_tone(f, m)
    d = synthetic.render_clip(np.random.default_rng(0), ("square", synthetic.TWO_TONE, "blue/red"), size=48,
                              num_frames=2, two_tone_side=32)
    assert np.array_equal(out, d["frames"][0])              # the clip with the other order
    assert np.array_equal(synthetic.swap_two_tone(out, m), f)
    with pytest.raises(ValueError, match="exactly 2 colours"):
        synthetic.swap_two_tone(f, np.ones_like(m))


def test_coarse_input_is_blind_to_the_order_on_the_tensor_the_loader_feeds(tmp_path):
    """Training items (augmented: flip, rotation, shift, scale, box trim): the loader's swapped
    prompt of (A over B) is the loader's prompt of (B over A) under the same draws, and the
    swap-averaged coarse tokens of the two clips agree; the plain tower (with positions) and the
    oracle's halves tell them apart (the positive control)."""
    from vb.tiny import build_tiny_videobooth
    from vb_train.data import PromptAugment, VideoBoothDataset
    from vb_train.videobooth_task import coarse_subject_tokens

    aug = PromptAugment(box_trim=0.2)
    sets = [VideoBoothDataset(_two_tone_set(tmp_path, c), num_frames=2, size=16, image_size=32, train=True,
                              prompt_augment=aug, paired_transform=synthetic.swap_two_tone, seed=5)
            for c in ("red/blue", "blue/red")]
    for epoch in range(3):
        for ds in sets:
            ds.set_epoch(epoch)
        ab, ba = sets[0].load(0), sets[1].load(0)
        assert torch.allclose(ab["image_paired"], ba["image"], atol=1e-6)
        assert torch.allclose(ba["image_paired"], ab["image"], atol=1e-6)
        assert not torch.allclose(ab["image"], ba["image"], atol=1e-2)
    parts = build_tiny_videobooth(seed=0)
    x = torch.stack([ab["image"], ba["image"]]).add(1).div(2)
    y = torch.stack([ab["image_paired"], ba["image_paired"]]).add(1).div(2)
    with torch.no_grad():
        sym, pooled = coarse_subject_tokens(parts.image_encoder, parts.mapper, x, y, "swap-average")
        plain, _ = coarse_subject_tokens(parts.image_encoder, parts.mapper, x, None, "image")
        halves, _ = coarse_subject_tokens(parts.image_encoder, parts.mapper, x, None, "halves")
    scale = sym.abs().max()
    assert (sym[0] - sym[1]).abs().max() < 1e-5 * scale and (pooled[0] - pooled[1]).abs().max() < 1e-5
    assert (plain[0] - plain[1]).abs().max() > 1e-3 * scale
    assert halves.shape[1] == 2 * plain.shape[1] and (halves[0] - halves[1]).abs().max() > 1e-3 * scale
    with pytest.raises(ValueError, match="swapped prompts"):
        coarse_subject_tokens(parts.image_encoder, parts.mapper, x, None, "swap-average")
    with pytest.raises(ValueError, match="model.coarse_input"):
        _task(coarse_input="swap-average")   # without data.paired_transform


# ---- scores ----------------------------------------------------------------------------------------
def test_soft_order_score_reads_the_arrangement_without_thresholds():
    from vb_train.metrics import two_tone_order_soft

    c = synthetic.render_clip(np.random.default_rng(1), ("square", synthetic.TWO_TONE, "green/purple"), size=32,
                              num_frames=3)
    video = torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    prompt = torch.full((3, 32, 32), 1.0)
    prompt[:, 8:16, 8:24] = torch.tensor(synthetic.COLOURS["green"])[:, None, None] / 127.5 - 1
    prompt[:, 16:24, 8:24] = torch.tensor(synthetic.COLOURS["purple"])[:, None, None] / 127.5 - 1
    right, wrong = two_tone_order_soft(video, prompt), two_tone_order_soft(video, prompt.flip(1))
    assert right > 0.05 and wrong < -0.05 and abs(right + wrong) < 1e-5
    # washed out towards grey (every pixel pulled 70% of the way): still the sign
    assert two_tone_order_soft(video * 0.3, prompt) > 0.02
    assert two_tone_order_soft(torch.zeros(2, 3, 8, 8), prompt) == 0.0


def test_ip_adapter_plus_tokens_see_the_arrangement_and_follow_the_pipeline_embeds():
    from vb.tiny import build_tiny_videobooth
    from vb_train.toy.ip_adapter import IPAdapter

    parts = build_tiny_videobooth(seed=0)
    ip = IPAdapter(parts.backbone, int(parts.image_encoder.embed_dim), kind="plus", image_encoder=parts.image_encoder)
    x = torch.full((2, 3, 32, 32), 1.0)
    x[0, :, :16], x[0, :, 16:] = 0.9, 0.1
    x[1, :, :16], x[1, :, 16:] = 0.1, 0.9
    with torch.no_grad():
        enc = parts.image_encoder(x)
        tok = ip.image_tokens(enc.layer_tokens[:, -1])
        assert (tok[0] - tok[1]).abs().max() > 1e-3
        assert torch.equal(ip._lookup(enc.image_embeds.flip(0)), enc.layer_tokens[:, -1].flip(0))
        with pytest.raises(RuntimeError, match="did not produce"):
            ip._lookup(torch.randn_like(enc.image_embeds))
    with pytest.raises(ValueError, match="image_encoder"):
        IPAdapter(parts.backbone, 8, kind="plus")
    ip.remove()


# ---- the gate, end to end ---------------------------------------------------------------------------
def test_study_gate_quick_run(tmp_path):
    """`python -m vb_train.toy.study --gate --quick`: units, tables, plot; the exemplars were
    cloned in the reference arm's stage 2; coarse only's flip scores are exactly 0 (its coarse
    input is order-blind and it has no fine path), the oracle's flip-loss gap is not."""
    from vb_train.toy import study

    out = tmp_path / "gate"
    assert study.main(["--gate", "--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "study.json").read_text())
    summ = res["summary"]
    assert set(summ) == set(study.GATE_ARMS) and res["gate"] is not None
    ref = json.loads((out / "units" / "ref-s0.json").read_text())
    assert ref["exemplars_cloned"] == 8 and len(ref["swapped"]) == len(ref["image"])
    co = json.loads((out / "units" / "coarse_only-s0.json").read_text())
    assert all(g == 0.0 for g in co["flip_loss_gap"])
    assert all(a["order_soft"] == b["order_soft"] for a, b in zip(co["image"], co["swapped"]))
    orc = json.loads((out / "units" / "oracle-s0.json").read_text())
    assert any(abs(g) > 0 for g in orc["flip_loss_gap"])
    md = (out / "study.md").read_text()
    assert "**Gate:**" in md and (out / "study.png").is_file()
    for r in summ.values():
        assert f"| {r['name']} |" in md
    with pytest.raises(ValueError, match="arms: unknown"):
        study.run_study("gate", study.settings("gate", quick=True, progress=False).__class__(
            study.settings("gate", quick=True, progress=False).demo, arms=("both",)), tmp_path / "x")


def test_t_interval_and_identity_clustering():
    from vb_train.toy import study

    # two identities, one with three clips: the identity means weigh equally
    assert study.seed_means([1, 1, 1, 0], ["a", "a", "a", "b"]) == 0.5
    r = study.t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and abs(r["ci95"][1] - (2.0 + 4.303 * 1.0 / 3 ** 0.5)) < 1e-9
    assert np.isnan(study.t_interval([1.0])["ci95"][0])


def test_study_full_quick_ip_adapter_plus_and_clean_latent_arms(tmp_path):
    """The full table's IP-Adapter-Plus arm samples through the pipeline (its resampler finds the
    encoder's layer tokens by the pooled embedding the pipeline passes) and its adapter trains;
    the clean-latent diagnostic samples with the clean image latent."""
    from vb_train.toy import study

    out = tmp_path / "full"
    assert study.main(["--full", "--quick", "--arms", "ipplus,clean", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "study.json").read_text())
    assert set(res["summary"]) == {"ipplus", "clean"}
    for key in ("ipplus", "clean"):
        u = json.loads((out / "units" / f"{key}-s0.json").read_text())
        assert len(u["swapped"]) == len(u["image"]) == len(u["flip_loss_gap"])
    from safetensors.torch import load_file
    names = load_file(str(next((out / "runs" / "ipplus-s0").rglob("trainable.safetensors"))))
    assert any(k.startswith("ip_adapter.resampler.") for k in names)


# ---- issue 32: colour pairs as the within-seed unit, two-sided sign tests, the controls' rule ------
def test_colour_pairs_are_the_within_seed_unit():
    from vb_train.toy import study

    assert study.colour_pair("square/two-tone/green/yellow") == study.colour_pair("circle/two-tone/yellow/green")
    assert study.colour_pair("square/striped/red") == "square/striped/red"
    ids = ["s/two-tone/a/b", "s/two-tone/a/b", "s/two-tone/b/a", "s/two-tone/c/d", "s/two-tone/d/c"]
    vals = [1.0, 3.0, 0.0, 4.0, 6.0]
    assert study.pair_means(vals, ids) == [1.0, 5.0]   # (mean(1, 3) + 0) / 2, (4 + 6) / 2
    # two orders moving together: over identities 4 units look independent, over pairs only 2
    ids4 = ["s/two-tone/a/b", "s/two-tone/b/a", "s/two-tone/c/d", "s/two-tone/d/c"]
    narrow = study.within_seed_interval([1.0, 1.1, 2.0, 2.1], ids4, unit="identity")
    wide = study.within_seed_interval([1.0, 1.1, 2.0, 2.1], ids4)
    assert wide[1] - wide[0] > 3 * (narrow[1] - narrow[0])
    with pytest.raises(ValueError, match="unit"):
        study.within_seed_interval(vals, ids, unit="clip")


def test_sign_test_is_two_sided():
    from vb_train.toy import study

    assert study.sign_test([1, 2, 3, 4, 5]) == {"positive": 5, "n": 5, "p": 0.0625}
    assert study.sign_test([-1, -2, -3, -4, -5])["p"] == 0.0625
    assert study.sign_test([1] * 6)["p"] == 0.03125
    assert study.sign_test([1, -1, 0])["n"] == 2 and study.sign_test([1, -1])["p"] == 1.0


def _arm(name, seeds, gap_ci, contrast_ci, gap_seed_means):
    from vb_train.toy import study

    return {"name": name, "seed_ids": seeds, "flip_gap_within_seed": gap_ci, "flip_contrast_within_seed": contrast_ci,
            "flip_loss_gap": study.t_interval(gap_seed_means),
            "sign_test": {"flip_loss_gap": study.sign_test(gap_seed_means)}}


def test_controls_verdict_marks_a_grey_seed_and_needs_a_positive_control():
    from vb_train.toy import study

    hold = [[-1.0, 1.0]] * 3
    summ = {"grey": _arm("grey", [0, 1, 2], hold, [[-1, 1], [-0.002, -0.0001], [-1, 1]], [0.1, -0.1, 0.0]),
            "oracle": _arm("oracle", [0, 1, 2], [[1, 2], [-1, 3], [2, 3]], hold, [1.0, 1.2, 0.9])}
    cv = study.controls_verdict(summ)
    assert not cv["clean"] and cv["grey_excludes_zero"] == {"flip_loss_gap": [], "flip_contrast": [1]}
    assert cv["positive_control_holds"] and cv["positive"]["oracle"]["seeds_excluding_zero"] == [0, 2]
    md = "\n".join(study.controls_lines(cv))
    assert "not clean" in md and "significant across seeds" in md
    summ["grey"]["flip_contrast_within_seed"] = hold
    summ["oracle"] = _arm("oracle", [0, 1, 2], hold, hold, [50.0, 0.1, 0.2])   # one seed carries it
    cv = study.controls_verdict(summ)
    assert cv["clean"] and not cv["positive_control_holds"]
    assert "no conclusion is drawn from its nulls" in "\n".join(study.controls_lines(cv))


def test_reread_of_the_committed_table_flags_grey_seed_2(tmp_path):
    """The committed held-out table re-read: the grey control's seed 2 flip-contrast interval
    ([-0.002, -0.000] over identities, issue 32) still excludes 0 over colour pairs, so that run is
    not clean; the oracle is not significant across seeds."""
    import shutil
    from pathlib import Path

    from vb_train.toy import study

    src = Path(__file__).resolve().parents[1] / "results" / "ablations" / "study_full" / "units"
    shutil.copytree(src, tmp_path / "study_full" / "units")
    md = study.reread(tmp_path / "study_full")
    res = json.loads((tmp_path / "study_full" / "study_reread.json").read_text())
    assert res["controls"]["grey_excludes_zero"]["flip_contrast"] == [2] and not res["controls"]["clean"]
    assert not res["controls"]["positive_control_holds"]
    assert "the run is not clean" in md and "no conclusion is drawn from its nulls" in md
    assert res["summary"]["ref"]["pairs"] == 10
