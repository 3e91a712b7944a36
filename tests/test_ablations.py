"""The two-tone ablation toy (issue 14): its identity and metric, the probe's logic, the
bag-of-patches coarse encoder, the IP-Adapter arm's wiring (against diffusers' own IP-Adapter
processor), and a quick end-to-end run of a few arms. Everything is tiny and random; nothing is
downloaded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vb_train.toy import synthetic
from vb_train.metrics import color_identity, two_tone_order


def _two_tone_prompt(a, b, size=32):
    """(3, S, S) in [-1, 1]: upper half colour a, lower half colour b (names), no white."""
    x = torch.empty(3, size, size)
    x[:, : size // 2] = torch.tensor(synthetic.COLOURS[a])[:, None, None]
    x[:, size // 2:] = torch.tensor(synthetic.COLOURS[b])[:, None, None]
    return x / 127.5 - 1


def _clip(identity, seed=0, size=64, frames=4):
    c = synthetic.render_clip(np.random.default_rng(seed), identity, size=size, num_frames=frames)
    return torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1, c


# ---- the identity and the metric -------------------------------------------------------------------
def test_two_tone_split_holds_out_colour_pairs_in_both_orders():
    split = synthetic.two_tone_split()
    held = {i for i, v in split.items() if v == "heldout"}
    train = {i for i, v in split.items() if v == "train"}
    assert len(held) == 20 and len(train) == 36
    pairs = lambda ids: {frozenset(synthetic.two_tone_colours(i[2])) for i in ids}  # noqa: E731
    assert not pairs(held) & pairs(train)          # a held-out colour pair is never seen in training
    for shape, pat, col in held:                   # ... and is held out in both orders
        a, b = synthetic.two_tone_colours(col)
        assert (shape, pat, f"{b}/{a}") in held
    assert {c for i in train for c in synthetic.two_tone_colours(i[2])} == set(synthetic.TWO_TONE_COLOURS)
    assert split == synthetic.two_tone_split()


def test_two_tone_clip_draws_equal_halves():
    video, c = _clip(("square", synthetic.TWO_TONE, "red/blue"))
    f0 = c["frames"][0].astype(int)
    m = c["mask0"]
    rows = np.nonzero(m.any(1))[0]
    top, bottom = f0[rows[: len(rows) // 2]], f0[rows[len(rows) // 2:]]
    cols = np.nonzero(m.any(0))[0]
    assert len(rows) == len(cols) and len(rows) % 2 == 0
    assert (np.abs(top[:, cols] - synthetic.COLOURS["red"]) <= 1).all()
    assert (np.abs(bottom[:, cols] - synthetic.COLOURS["blue"]) <= 1).all()
    with pytest.raises(ValueError, match="two-tone subject"):
        synthetic.render_clip(np.random.default_rng(0), ("circle", synthetic.TWO_TONE, "red/blue"), size=64)
    with pytest.raises(ValueError, match="upper/lower"):
        synthetic.two_tone_colours("red/red")


def test_two_tone_order_sees_the_arrangement_that_colour_identity_cannot():
    video, _ = _clip(("square", synthetic.TWO_TONE, "green/pink"), seed=3)
    right, swapped = _two_tone_prompt("green", "pink"), _two_tone_prompt("pink", "green")
    assert two_tone_order(video, right) == pytest.approx(1.0)
    assert two_tone_order(video, swapped) == pytest.approx(-1.0)
    # the colour histogram cannot tell the two orders apart
    assert color_identity(video, right) == pytest.approx(color_identity(video, swapped), abs=1e-6)
    # a frame without the second colour says nothing
    one = video.clone()
    pink = torch.tensor(synthetic.COLOURS["pink"]) / 127.5 - 1
    near = ((one - pink[None, :, None, None]).abs().amax(1) < 0.1)[:, None].expand_as(one)
    one[near] = 0.0
    assert two_tone_order(one, right) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="tol"):
        two_tone_order(video, right, tol=0)


# ---- the probe ------------------------------------------------------------------------------------
def test_linear_probe_decodes_a_linear_target_and_not_noise():
    from vb_train.toy.probe import linear_probe, order_accuracy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    w = rng.normal(size=(20, 3))
    y = x @ w + 0.05 * rng.normal(size=(300, 3))
    good = linear_probe(x[:200], y[:200], x[200:], y[200:], groups_tr=np.arange(200) % 10)
    assert good["r2"] > 0.95
    noise = rng.normal(size=(300, 3))
    bad = linear_probe(x[:200], noise[:200], x[200:], noise[200:])
    assert bad["r2"] < 0.1
    up, low = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    assert order_accuracy(up - low, up, low) == 1.0
    assert order_accuracy(low - up, up, low) == 0.0


def test_bag_of_patches_tower_cannot_tell_the_two_orders_apart():
    """With the positional embedding dropped, the coarse path's input features of (A over B)
    and (B over A) are the same (the probe's claim, exactly); with it they differ."""
    import vb
    from vb_train.toy.probe import features
    from vb_train.videobooth_task import drop_clip_positions

    parts = vb.build_tiny_videobooth(seed=0)
    ims = torch.stack([_two_tone_prompt("red", "cyan"), _two_tone_prompt("cyan", "red")])
    with_pos = features(ims, parts, 16)
    drop_clip_positions(parts.image_encoder)
    bag = features(ims, parts, 16)
    for k in ("coarse: CLS tokens", "coarse: mean patch tokens", "coarse: pooled embedding"):
        assert np.abs(bag[k][0] - bag[k][1]).max() < 1e-4 * np.abs(bag[k]).max()
        assert np.abs(with_pos[k][0] - with_pos[k][1]).max() > 1e-2 * np.abs(with_pos[k]).max()
    lat = bag["fine: VAE latent"]
    assert np.abs(lat[0] - lat[1]).max() > 0.1 * np.abs(lat).max()   # the fine path's input differs


# ---- the IP-Adapter arm ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_ip_adapter_hook_equals_diffusers_ip_adapter_processor(scale):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from vb_train.toy.ip_adapter import IPAdapter

    torch.manual_seed(0)
    c, d, e, b, n = 16, 12, 10, 3, 7

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn2 = Attention(c, cross_attention_dim=d, heads=2, dim_head=c // 2)
            self.attn2.set_processor(AttnProcessor2_0())

        def forward(self, x, text, image_embeds=None):
            return self.attn2(x, encoder_hidden_states=text)

    net = Net()
    ip = IPAdapter(net, e, num_tokens=4, scale=scale)
    with torch.no_grad():
        for p in ip.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, text, emb = torch.randn(b, n, c), torch.randn(b, 5, d), torch.randn(b, e)
    out = net(x, text, image_embeds=emb)

    ref_attn = Attention(c, cross_attention_dim=d, heads=2, dim_head=c // 2)
    ref_attn.load_state_dict(net.attn2.state_dict())
    proc = IPAdapterAttnProcessor2_0(c, d, num_tokens=(4,), scale=scale)
    proc.to_k_ip[0].load_state_dict(ip.to_k_ip[0].state_dict())
    proc.to_v_ip[0].load_state_dict(ip.to_v_ip[0].state_dict())
    ref_attn.set_processor(proc)
    with torch.no_grad():
        tokens = ip.image_tokens(emb)
    ref = ref_attn(x, encoder_hidden_states=(text, [tokens]))
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    # no image embedding: the backbone as before; and the image term is not a no-op
    plain = net(x, text)
    assert not torch.allclose(plain, out, atol=1e-3)
    ip.remove()
    assert torch.equal(net(x, text, image_embeds=emb), plain)


# ---- a quick end-to-end run -----------------------------------------------------------------------
def test_ablations_quick_run(tmp_path):
    """The quick run of three arms: tables, plots and units written; each arm generated as it
    trained (the IP arm's adapter is in its checkpoint; coarse-only has no fine branch)."""
    from vb_train.toy import ablations as A

    a = A.AblationSettings.quick(("both", "coarse", "ipadapter"), progress=False)
    res = A.run_ablations(a, tmp_path)
    summ = res["summary"]
    assert set(summ) == {"both", "coarse", "ipadapter"}
    for k, r in summ.items():
        assert -1 <= r["order_image"] <= 1 and 0 <= r["color_image"] <= 1
        assert len(r["order_f_image"]) == a.demo.frames
    assert "vs_both" in summ["coarse"] and "vs_both" in summ["ipadapter"]
    assert summ["coarse"]["cost"]["image_tokens"] == 0 and summ["both"]["cost"]["image_tokens"] == 64
    md = (tmp_path / "ablations.md").read_text()
    assert "IP-Adapter" in md and (tmp_path / "ablations_paper.png").is_file()
    unit = json.loads((tmp_path / "units" / "ipadapter-s0.json").read_text())
    assert unit["arm"] == "ipadapter" and len(unit["image"]) == a.demo.heldout_subjects
    from safetensors.torch import load_file
    names = load_file(str(next((tmp_path / "runs" / "ipadapter-s0").rglob("trainable.safetensors"))))
    assert any(k.startswith("ip_adapter.to_k_ip.") for k in names)
    # a rerun finds every unit done
    res2 = A.run_ablations(a, tmp_path)
    assert res2["summary"]["both"]["order_image"] == summ["both"]["order_image"]
    with pytest.raises(ValueError, match="arms: unknown"):
        A.run_ablations(A.AblationSettings.quick(("nope",)), tmp_path)


def test_ablations_cli_quick_with_a_long_clip_arm(tmp_path):
    """`python -m vb_train.toy.ablations --quick` through main(): the reference arm and a long-clip arm
    (which starts from the reference arm's stage 2) give their tables, plots and JSON."""
    from vb_train.toy import ablations

    out = tmp_path / "abl"
    assert ablations.main(["--out", str(out), "--quick", "--arms", "both,long_first", "--no-progress"]) == 0
    md = (out / "ablations.md").read_text()
    res = json.loads((out / "ablations.json").read_text())
    assert set(res["summary"]) == {"both", "long_first"}
    for key in ("both", "long_first"):
        assert f"| {res['summary'][key]['name']} |" in md
    long = res["summary"]["long_first"]
    assert "order_last8" in long and len(long["order_f_image"]) == res["settings"]["long_frames"]
    assert "order_last8" not in res["summary"]["both"]
    assert (out / "ablations_schedule.png").stat().st_size > 0 and "ablations_schedule.png" in md


# ---- the parallel unit runner stops its workers -------------------------------------------------
def test_failed_unit_stops_the_running_units_at_once():
    """With --jobs 2, a unit that fails ends the run with its error without waiting for the other
    running unit (a 120 s sleep here); the old runner waited for it (the pool's shutdown)."""
    from vb_train.toy import ablations as A

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="invalid literal"):
        A._run_units({"slow": ("time:sleep", (120,)), "bad": ("builtins:int", ("x",))}, {}, jobs=2, threads=1)
    assert time.perf_counter() - t0 < 60


def test_sigterm_ends_the_workers_with_the_runner(tmp_path):
    """SIGTERM to a runner with two units running: it exits and takes its spawned workers with it
    (before, they went on running orphaned). The runner gets a session of its own, so that every
    process it started is in its process group: none may be left."""
    script = tmp_path / "run.py"
    script.write_text("from vb_train.toy import ablations as A\n"
                      "if __name__ == '__main__':\n"
                      "    A._run_units({'a': ('time:sleep', (300,)), 'b': ('time:sleep', (300,))}, {}, jobs=2, threads=1)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        started = [proc.stdout.readline() for _ in range(2)]
        assert all("start" in line for line in started), started
        time.sleep(3)  # the workers are up: the pool spawns them as the units are submitted
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        raise AssertionError("processes of the runner's group outlived it")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, even when an assertion failed
        except ProcessLookupError:
            pass
