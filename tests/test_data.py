"""vb_train.data (the VideoBooth loader) and vb_train.toy.synthetic (the set it is tested on).

Everything is written to tmp_path: tiny synthetic sets (32 px, 8 frames), nothing downloaded.
"""
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vb_train.toy import synthetic
from vb_train.data import (
    PromptAugment,
    SampleError,
    VideoBoothDataset,
    augment_image_prompt,
    center_crop_resize,
    choose_frame_indices,
    make_image_prompt,
    read_frames,
)

SMALL = dict(size=32, num_frames=8, progress=False)


@pytest.fixture(scope="module")
def mp4_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn_mp4")
    synthetic.generate(root, 10, seed=0, fmt="mp4", **SMALL)
    return root


@pytest.fixture(scope="module")
def frames_set(tmp_path_factory):
    # one identity, lossless frames: exact pixel checks are possible
    root = tmp_path_factory.mktemp("syn_frames")
    synthetic.generate(root, 3, seed=1, fmt="frames", identities=[("circle", "solid", "blue")],
                       **SMALL)
    return root


def _rows(root):
    rows = []
    for p in sorted(Path(root).glob("*.csv")):
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


# --------------------------------------------------------------------------------------------
# loader: shapes, ranges, triplets
# --------------------------------------------------------------------------------------------
def test_item_shapes_ranges_and_fields(mp4_set):
    ds = VideoBoothDataset(mp4_set, num_frames=4, frame_stride=2, size=(24, 32), image_size=40)
    assert len(ds) == 10
    captions = {r["videoid"]: r["name"] for r in _rows(mp4_set)}
    for i in (0, 5, 9):
        it = ds[i]
        assert it["video"].shape == (4, 3, 24, 32) and it["video"].dtype == torch.float32
        assert it["image"].shape == (3, 40, 40) and it["image"].dtype == torch.float32
        for k in ("video", "image"):
            assert it[k].min() >= -1.0 and it[k].max() <= 1.0
        assert it["subject"] in synthetic.SHAPES
        assert it["caption"] == captions[it["video_id"]]
        assert f" {it['subject']} moving" in it["caption"]
        assert it["category"] == it["subject"] and it["index"] == i and it["skipped"] == 0
    assert ds.report()["loaded"] == 3 and ds.report()["bad_items"] == 0


def test_dataloader_batches(mp4_set):
    ds = VideoBoothDataset(mp4_set, num_frames=3, size=16, image_size=16)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["video"].shape == (4, 3, 3, 16, 16)
    assert batch["image"].shape == (4, 3, 16, 16)
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert batch["skipped"].tolist() == [0, 0, 0, 0]


def test_subject_cut_out_on_white(frames_set):
    # eval mode: no augmentation, so the prompt is the plain cut-out
    ds = VideoBoothDataset(frames_set, num_frames=2, size=32, image_size=32, train=False)
    it = ds[0]
    img = it["image"]
    # a circle inscribed in its padded square: the corners are outside it, so white
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert torch.all(img[:, y, x] == 1.0)
    # the centre is the subject's colour (blue), not the background's
    want = torch.tensor(synthetic.COLOURS["blue"], dtype=torch.float32) / 127.5 - 1
    centre = img[:, 12:20, 12:20].mean((1, 2))
    assert torch.allclose(centre, want, atol=0.05)
    # nothing of the background is left: every pixel is white, blue, or (at the edge, where
    # resizing blends them) on the segment between the two
    white = torch.ones(3, 1, 1)
    d = want[:, None, None] - white
    t = (((img - white) * d).sum(0) / (d * d).sum()).clamp(0, 1)
    residual = (img - (white + t * d)).norm(dim=0)
    assert residual.max() < 0.15


def test_make_image_prompt_exact():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:11, 4:14] = True
    mask[5, 4] = False  # a hole: must be white too
    # box 10 wide x 6 high -> padded to 10 x 10 (2 rows of white above, 2 below); size 10 means
    # no resampling, so the values are exact
    img = make_image_prompt(frame, mask, [4, 5, 14, 11], size=10)
    assert img.shape == (3, 10, 10)
    assert torch.all(img[:, :2] == 1) and torch.all(img[:, 8:] == 1)
    expect = torch.from_numpy(frame[5:11, 4:14]).permute(2, 0, 1).float() / 127.5 - 1
    expect[:, 0, 0] = 1.0
    assert torch.allclose(img[:, 2:8], expect, atol=1e-6)
    # a mask of another resolution is resized with the box scaled alike
    big = np.repeat(np.repeat(mask, 2, 0), 2, 1)
    img2 = make_image_prompt(frame, big, [8, 10, 28, 22], size=10)
    assert torch.allclose(img, img2, atol=1e-6)
    with pytest.raises(SampleError, match="bad_box"):
        make_image_prompt(frame, mask, [40, 5, 50, 11], size=10)
    with pytest.raises(ValueError, match="frame0"):
        make_image_prompt(frame[..., 0], mask, [4, 5, 14, 11], size=10)


def test_prompt_augmentation_fills_white_and_is_seeded(mp4_set):
    white = torch.ones(3, 16, 16)
    out = augment_image_prompt(white, np.random.default_rng(0), PromptAugment(degrees=45))
    assert torch.allclose(out, white)
    img = torch.rand(3, 16, 16) * 2 - 1
    ident = PromptAugment(hflip=0.0, degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0))
    out = augment_image_prompt(img, np.random.default_rng(0), ident)
    assert torch.allclose(out, img, atol=1e-5)
    flip = PromptAugment(hflip=1.0, degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0))
    assert torch.allclose(augment_image_prompt(img, np.random.default_rng(0), flip),
                          img.flip(-1), atol=1e-5)
    # an item is a function of (seed, epoch, index): same twice, new draws next epoch
    ds = VideoBoothDataset(mp4_set, num_frames=2, size=16, image_size=24, seed=3)
    a, b = ds[1], ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["video"], b["video"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a["image"])
    with pytest.raises(ValueError, match="hflip"):
        PromptAugment(hflip=2.0)


def test_video_transform_same_for_every_frame():
    frame = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    out = center_crop_resize(np.stack([frame, frame, frame]), (12, 12))
    assert out.shape == (3, 3, 12, 12)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # resize the shorter side 24 -> 12 (width 40 -> 20), then centre crop columns 4..16
    full = center_crop_resize(frame[None], (12, 20))
    assert torch.allclose(out[0], full[0, :, :, 4:16])


def test_frame_indices_and_stride(frames_set):
    assert choose_frame_indices(20, 4, 3, None) == [0, 3, 6, 9]
    assert choose_frame_indices(20, 4, 3, 0.999) == [10, 13, 16, 19]
    assert choose_frame_indices(6, 4, 3, 0.5) == [0, 2, 3, 5]  # too short for stride 3: even
    with pytest.raises(SampleError, match="too_short"):
        choose_frame_indices(3, 4, 1, None)
    folder = next((frames_set / "circle").iterdir())
    files = sorted((folder / "frames").glob("*.png"))
    clip, frame0 = read_frames(files, 3, 3, None)
    assert clip.shape == (3, 32, 32, 3)
    assert np.array_equal(clip[1], np.asarray(Image.open(files[3]).convert("RGB")))
    assert np.array_equal(frame0, clip[0])


# --------------------------------------------------------------------------------------------
# bad files: skipped, counted, reported
# --------------------------------------------------------------------------------------------
def test_bad_files_are_skipped_counted_and_reported(mp4_set, tmp_path, caplog):
    root = tmp_path / "set"
    shutil.copytree(mp4_set, root)
    ds0 = VideoBoothDataset(root)
    recs = ds0.records
    (recs[1].folder / "video.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 50)
    (recs[4].folder / "mask.json").unlink()
    (recs[5].folder / "mask_1.png").unlink()
    (recs[8].folder / "video.mp4").unlink()
    (recs[9].folder / "mask.json").write_text("{not json")

    ds = VideoBoothDataset(root, num_frames=4, size=16, image_size=16)
    with caplog.at_level(logging.WARNING, logger="vb_train.data"):
        got = [it for it in torch.utils.data.DataLoader(ds, batch_size=1)]  # a whole epoch
    assert len(got) == len(ds)
    idx = [int(it["index"]) for it in got]
    assert 1 not in idx and 4 not in idx and 5 not in idx and 8 not in idx and 9 not in idx
    assert idx[1] == 2 and idx[4] == 6 and idx[5] == 6 and idx[9] == 0  # the next good one
    assert int(got[4]["skipped"][0]) == 2
    rep = ds.report()
    assert rep["bad_items"] == 5
    assert set(rep["skipped"]) == {"bad_video", "missing_mask", "missing_video", "bad_mask"}
    assert rep["skipped"]["missing_mask"] >= 2
    assert any(recs[1].videoid in k for k in rep["bad"])
    assert "bad_video" in rep["bad"][f"{recs[1].category}/{recs[1].videoid}"]
    # each bad item is logged once, however often it is skipped
    assert sum(recs[4].videoid in r.getMessage() for r in caplog.records) == 1

    # a fresh dataset finds the same through scan(), and strict mode raises instead
    rep2 = VideoBoothDataset(root, num_frames=4, size=16, image_size=16).scan()
    assert rep2["bad_items"] == 5 and set(rep2["bad"]) == set(rep["bad"])
    with pytest.raises(SampleError):
        VideoBoothDataset(root, num_frames=4, size=16, image_size=16, strict=True)[1]


def test_all_bad_raises_with_report(mp4_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(mp4_set, root)
    for p in root.glob("*/*/mask.json"):
        p.unlink()
    ds = VideoBoothDataset(root, num_frames=2, size=16, image_size=16)
    with pytest.raises(RuntimeError, match="missing_mask"):
        ds[0]


def test_too_short_video_is_skipped(mp4_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(mp4_set, root)
    ds = VideoBoothDataset(root, num_frames=9, size=16, image_size=16)  # clips have 8
    with pytest.raises(RuntimeError, match="too_short"):
        ds[0]


def test_webvid_video_root_and_caption_column(mp4_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(mp4_set, root)
    rec = VideoBoothDataset(root).records[0]
    webvid = tmp_path / "webvid"
    (webvid / rec.page_dir).mkdir(parents=True)
    shutil.move(rec.folder / "video.mp4", webvid / rec.page_dir / f"{rec.videoid}.mp4")
    ds = VideoBoothDataset(root, video_root=webvid, num_frames=2, size=16, image_size=16,
                           caption_column="short_caption")
    it = ds[0]
    assert it["index"] == 0 and it["video"].shape == (2, 3, 16, 16)
    assert it["caption"].startswith(f"a {it['subject']} moving")
    assert VideoBoothDataset(root, num_frames=2, size=16, image_size=16)[0]["index"] == 1


def test_bad_arguments(mp4_set, tmp_path):
    with pytest.raises(ValueError, match="num_frames"):
        VideoBoothDataset(mp4_set, num_frames=0)
    with pytest.raises(ValueError, match="size"):
        VideoBoothDataset(mp4_set, size=(16,))
    with pytest.raises(TypeError, match="prompt_augment"):
        VideoBoothDataset(mp4_set, prompt_augment={"hflip": 0.5})
    with pytest.raises(ValueError, match="root"):
        VideoBoothDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="categories"):
        VideoBoothDataset(mp4_set, categories=["dragon"])
    (tmp_path / "x.csv").write_text("id,caption\n1,a dog\n")
    with pytest.raises(ValueError, match="videoid"):
        VideoBoothDataset(tmp_path)


# --------------------------------------------------------------------------------------------
# synthetic set
# --------------------------------------------------------------------------------------------
def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", 6, seed=7, fmt="frames", **SMALL)
    b = synthetic.generate(tmp_path / "b", 6, seed=7, fmt="frames", **SMALL)
    assert a == b
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    c = synthetic.generate(tmp_path / "c", 6, seed=8, fmt="frames", **SMALL)
    assert [r["name"] for r in a] != [r["name"] for r in c]
    # mp4: the same file from the same arguments (the mp4 test below checks what else could move it)
    synthetic.generate(tmp_path / "m1", 2, seed=7, **SMALL)
    synthetic.generate(tmp_path / "m2", 2, seed=7, **SMALL)
    for p in (tmp_path / "m1").rglob("video.mp4"):
        assert p.read_bytes() == (tmp_path / "m2" / p.relative_to(tmp_path / "m1")).read_bytes()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MALLOC_PERTURB_ is glibc's")
def test_synthetic_mp4_does_not_read_uninitialised_memory(tmp_path):
    """The same mp4 bytes whatever the heap held before: two processes that fill fresh and
    freed memory with different bytes (glibc's MALLOC_PERTURB_) must write the same files.
    x264's lookahead read uninitialised memory at 32 px: these files differed between the two
    processes (and, in one process, after a decode in between: a CI failure) until the encoder
    was told not to look ahead (checked)."""
    code = ("import sys; from pathlib import Path; from vb_train.toy import synthetic; "
            "synthetic.generate(Path(sys.argv[1]), 4, seed=7, size=32, num_frames=8, progress=False)")
    files = []
    for fill in ("85", "170"):
        out = tmp_path / fill
        subprocess.run([sys.executable, "-c", code, str(out)], check=True,
                       env={**os.environ, "MALLOC_PERTURB_": fill})
        files.append({p.relative_to(out): p.read_bytes() for p in out.rglob("video.mp4")})
    assert len(files[0]) == 4 and files[0] == files[1]


def test_synthetic_layout_and_content(frames_set):
    rows = _rows(frames_set)
    assert len(rows) == 3
    for r in rows:
        tail = f"moving {r['motion']} on a {r['background']} background"
        assert r["name"] == f"a blue solid circle {tail}"
        assert r["short_caption"] == f"a circle {tail}"
        folder = frames_set / "circle" / r["videoid"]
        entries = json.loads((folder / "mask.json").read_text())
        subj = [e for e in entries if e["value"] == 1][0]
        assert subj["label"] == "circle"
        mask = np.asarray(Image.open(folder / "mask_1.png")) > 0
        ys, xs = np.nonzero(mask)
        assert subj["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        frame0 = np.asarray(Image.open(folder / "frames" / "000000.png"))
        assert np.abs(frame0[mask].astype(int) - synthetic.COLOURS["blue"]).max() <= 1
        assert len(list((folder / "frames").glob("*.png"))) == 8
    meta = json.loads((frames_set / "meta.json").read_text())
    assert meta["complete"] and meta["num"] == 3


def test_heldout_split_is_disjoint(tmp_path):
    split = synthetic.subject_split()
    train = {i for i, s in split.items() if s == "train"}
    held = {i for i, s in split.items() if s == "heldout"}
    assert train and held and not train & held
    assert train | held == set(synthetic.all_identities())
    assert {i[0] for i in held} == set(synthetic.SHAPES)  # every shape has held-out subjects
    assert split == synthetic.subject_split()  # fixed, whatever the generation seed
    # sets written with different seeds and splits share no subject
    tr = synthetic.generate(tmp_path / "tr", 40, seed=0, split="train", size=16, num_frames=2,
                            fmt="frames", progress=False)
    he = synthetic.generate(tmp_path / "he", 40, seed=1, split="heldout", size=16,
                            num_frames=2, fmt="frames", progress=False)
    ident = lambda rows: {(r["shape"], r["pattern"], r["colour"]) for r in rows}  # noqa: E731
    assert ident(tr) <= train and ident(he) <= held
    assert not ident(tr) & ident(he)
    assert {r["split"] for r in he} == {"heldout"}


def test_synthetic_arguments_and_overwrite(tmp_path):
    with pytest.raises(ValueError, match="split"):
        synthetic.generate(tmp_path / "x", 2, split="test", progress=False)
    with pytest.raises(ValueError, match="num"):
        synthetic.generate(tmp_path / "x", 0, progress=False)
    with pytest.raises(ValueError, match="size"):
        synthetic.generate(tmp_path / "x", 1, size=33, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        synthetic.generate(other, 1, overwrite=True, progress=False)
    assert (other / "keep.txt").exists()
    synthetic.generate(tmp_path / "s", 1, fmt="frames", **SMALL)
    with pytest.raises(FileExistsError):
        synthetic.generate(tmp_path / "s", 1, fmt="frames", **SMALL)
    synthetic.generate(tmp_path / "s", 2, fmt="frames", overwrite=True, **SMALL)
    assert len(_rows(tmp_path / "s")) == 2


def test_subject_radius(tmp_path):
    for bad in [(0.3, 0.2), (0.0, 0.1), (0.2, 0.5)]:
        with pytest.raises(ValueError, match="subject_radius"):
            synthetic.render_clip(np.random.default_rng(0), ("circle", "solid", "red"), size=32, subject_radius=bad)
    area = {}
    for r in [(0.15, 0.15), (0.3, 0.3)]:
        clip = synthetic.render_clip(np.random.default_rng(0), ("circle", "solid", "red"), size=64, num_frames=3,
                                     subject_radius=r)
        area[r] = clip["mask0"].mean()
        x1, y1, x2, y2 = clip["box"]
        assert x2 - x1 == pytest.approx(2 * r[0] * 64, abs=2)
    assert area[(0.3, 0.3)] == pytest.approx(4 * area[(0.15, 0.15)], rel=0.15)
    synthetic.generate(tmp_path / "big", 1, fmt="frames", subject_radius=(0.3, 0.32), **SMALL)
    assert json.loads((tmp_path / "big" / "meta.json").read_text())["subject_radius"] == [0.3, 0.32]


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vb_train.toy.synthetic", "--out", str(out), "--num", "3",
                        "--seed", "2", "--size", "16", "--frames", "2", "--no-progress"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "wrote 3 clips" in r.stdout
    assert len(list(out.rglob("video.mp4"))) == 3


# ---- seekable decoding -----------------------------------------------------------------------
def _write_gop_video(path, n=90, gop=8, size=32, fps=8):
    """An mp4 (libx264, a keyframe every `gop` frames) whose frame i is flat grey level 2i."""
    import av

    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width = st.height = size
        st.pix_fmt = "yuv420p"
        st.codec_context.gop_size = gop
        st.codec_context.options = {"crf": "10", "keyint_min": str(gop), "sc_threshold": "0"}
        for i in range(n):
            img = np.full((size, size, 3), 2 * i, np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def test_seeking_decoder_reads_the_same_frames_as_decoding_from_the_start(tmp_path):
    pytest.importorskip("av")
    from vb_train.data import SEEK_GAP, _decode_av

    path = tmp_path / "gop.mp4"
    _write_gop_video(path)
    wanted = {0, 50, 54, 58, 62, 89}
    assert max(wanted) - 0 > SEEK_GAP  # the seek path is taken
    seek, n1, end1 = _decode_av(path, wanted, seek=True)
    full, n2, end2 = _decode_av(path, wanted, seek=False)
    assert sorted(seek) == sorted(full) == sorted(wanted) and (n1, end1) == (n2, end2) == (90, False)
    for i in wanted:
        assert np.array_equal(seek[i], full[i]), i
        assert abs(int(full[i].mean()) - 2 * i) <= 2  # frame i really is frame i
    # past the end: the frames that exist, and the end reached
    keep, n, ended = _decode_av(path, {10, 200}, seek=True)
    assert sorted(keep) == [10] and ended
    # the public reader's switch (what python -m vb_train.throughput compares): same clip either way
    from vb_train.data import read_frames

    clips = [read_frames(path, 6, 12, 0.9, seek=s) for s in (True, False)]
    assert all(np.array_equal(a, b) for a, b in zip(*clips))
