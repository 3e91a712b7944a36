"""A sharded training run for real (issue 30): accelerate refuses FSDP on CPU processes (it sets
FSDP up on accelerators only and gives DDP on gloo instead; tests/test_train_dist.py), but
PyTorch's FSDP2 ``fully_shard`` runs on CPU with gloo. So ``accelerate launch`` with the
shipped configs/accelerate/fsdp.yaml (``fsdp_version: 2``; only ``--num_processes 2`` and
``--mixed_precision no`` given on the command line) starts 2 CPU processes, accelerate's own
``fsdp2_prepare_model`` shards the tiny VideoBooth task with the config's units, and the
trainer's stage-2 step (frozen base, trainable mapper and injection projections) gives the
unsharded step's loss, gradient norm and weights; the sharded state (accelerate's distributed
checkpoint of model and optimizer) resumes bit for bit (tests/fsdp_stage2_step.py).
About 40 s on 2 cores (two interpreters importing torch and diffusers, 3 tiny models each)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_train_dist import ROOT, _free_port, _launcher


def test_fsdp2_stage2_step_on_two_cpu_processes_matches_one_process_and_resumes(tmp_path):
    pytest.importorskip("open_clip")
    from vb_train.toy.synthetic import generate

    shipped = ROOT / "configs" / "accelerate" / "fsdp.yaml"
    assert "fsdp_version: 2" in shipped.read_text()
    data = tmp_path / "syn"
    generate(data, 8, seed=0, size=32, num_frames=4, fmt="frames", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    cmd = _launcher() + ["--config_file", str(shipped), "--num_processes", "2", "--mixed_precision", "no",
                         "--main_process_port", str(_free_port()), str(ROOT / "tests" / "fsdp_stage2_step.py"),
                         str(out), str(data)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
    s = json.loads((out / "summary.json").read_text())
    assert s["world"] == 2 and s["trainable"] > 0
    assert abs(s["local_fraction"] - 0.5) < 0.01  # each process holds half of every weight
    for (loss, norm), (ref_loss, ref_norm) in zip(s["sharded"], s["ref"]):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and abs(norm - ref_norm) <= 1e-4 * abs(ref_norm)
    assert s["resumed"] == s["sharded"][1]
    assert "__0_0.distcp" in s["checkpoint"] and "__1_0.distcp" in s["checkpoint"]  # one shard per process
