"""The CPU demo and the ablations, end to end at --quick sizes (tiny data, a few steps: the
numbers mean nothing, the files and tables are what is checked)."""
import json

import pytest

pytest.importorskip("open_clip")


def test_demo_quick_writes_gifs_and_table_and_is_reproducible(tmp_path):
    from vb_train.toy import demo

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick", "--no-progress"]) == 0
    md = (out / "metrics.md").read_text()
    for arm in (demo.ARM_IMAGE, demo.ARM_TEXT, demo.ARM_REAL):
        assert f"| {arm} |" in md
    assert "color_id" in md and "with image - text only" in md
    res = json.loads((out / "metrics.json").read_text())
    for arm in (demo.ARM_IMAGE, demo.ARM_TEXT):
        for key in ("color_id", "color_id_other", "color_top1"):
            a = res["arms"][arm][key]
            assert 0.0 <= a["mean"] <= 1.0 and a["n"] == res["settings"]["heldout_subjects"]
    assert set(res["training"]) == {"stage1", "stage2"}
    assert res["training"]["stage2"]["export"]           # the trainer's adapter export
    per_video = json.loads((out / "per_video.json").read_text())
    assert len(per_video[demo.ARM_IMAGE]) == res["settings"]["heldout_subjects"]
    gifs = out / "gifs"
    assert (gifs / "grid.gif").stat().st_size > 0 and (gifs / "grid.png").is_file()
    assert len(list((gifs / "with_image").glob("*.gif"))) == res["settings"]["gif_rows"]
    assert len(list((gifs / "text_only").glob("*.gif"))) == res["settings"]["gif_rows"]
    from PIL import Image
    with Image.open(gifs / "grid.gif") as im:
        assert im.n_frames == res["settings"]["frames"]
    with Image.open(out / "loss.png") as im:
        assert im.size[0] > 300
    # the trainer ran both stages; stage 2 started from stage 1
    state = json.loads(next((out / "runs" / "stage2" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["stage"] == 2 and state["init_from"]

    # same seed, same numbers (data, VAE, both stages and generation are seeded)
    out2 = tmp_path / "demo2"
    assert demo.main(["--out", str(out2), "--quick", "--no-progress"]) == 0
    res2 = json.loads((out2 / "metrics.json").read_text())
    assert res2["arms"] == res["arms"]
    assert res["training"]["stage2"]["exemplars_cloned"] == 8   # from stage 1's trained attn1 K/V

    # the guidance sweep on the trained run: guidance 1 with a grey unconditional image is the table's
    assert demo.main(["--out", str(out), "--quick", "--no-progress", "--guidance-sweep"]) == 0
    sweep = json.loads((out / "guidance_sweep.json").read_text())
    assert [(r["guidance"], r["uncond_image"]) for r in sweep] == list(demo.GUIDANCE_SWEEP)
    assert abs(sweep[0]["color_id_image"] - res["arms"][demo.ARM_IMAGE]["color_id"]["mean"]) < 1e-6
    with pytest.raises(FileNotFoundError, match="no trained demo run"):
        demo.guidance_sweep(demo.DemoSettings.quick(), tmp_path / "none")


def test_demo_settings_from_command_line():
    from vb_train.toy import demo

    args = demo.build_parser().parse_args(["--steps1", "7", "--lr", "0.01", "--guidance-scale", "3",
                                           "--attn-backend", "sdpa", "model.learn_query=true"])
    s = demo.settings_from_args(args)
    assert (s.steps1, s.lr, s.guidance_scale, s.attn_backend) == (7, 0.01, 3.0, "sdpa")
    assert s.extra == {"model.learn_query": True}
    cfg = demo.stage_config(s, 2, data_root="d", output_dir="o", vae_file="v.safetensors", init_from="s1")
    assert cfg.stage == 2 and cfg.model["learn_query"] is True and cfg.attn_backend == "sdpa"
    assert cfg.model["extra_trainable"] == ["^backbone\\."] and cfg.data["caption_column"] == "short_caption"
    assert cfg.init_from == "s1" and cfg.model["base_weights"] == "v.safetensors"
