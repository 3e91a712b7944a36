"""Packaging: no top-level import name of this project is another PyPI package's.

The op package used to be a top-level ``kernels``, which is also Hugging Face's kernel hub on
PyPI, a dependency of transformers >= 5 that transformers imports whenever it is installed. From
the repo root ours shadowed theirs (``import vb`` -> diffusers -> transformers ->
``from kernels import CUDAProperties`` failed); from any other folder theirs shadowed ours.
These tests run a fresh interpreter from the repo root and from an unrelated folder, with
whatever ``kernels`` the resolver installed, and check that both packages import as themselves
and that a tiny pipeline saves and loads through diffusers/transformers.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level import names of this project and the PyPI packages known to own them; each was
# checked against the registry (sdist/wheel contents) when the name was chosen. `kernels`
# (HF kernel hub) and `train` (an RL library, import name `train`) are why the op package is
# `vb_kernels` and the trainer `vb_train`; PyPI's `bench` ships only a script, no module.
PACKAGES = ("vb_kernels", "vb", "vb_train", "bench")
TAKEN = {"kernels": "Hugging Face kernels (a transformers >= 5 dependency)", "train": "PyPI train 0.0.5"}

PROBE = r"""
import json, os, sys, tempfile
out = {"cwd": os.getcwd()}
import vb, vb_kernels
from vb_kernels import Schedule, videobooth_attention
out["vb_kernels"] = vb_kernels.__file__
try:
    import kernels  # transformers' dependency, when the resolver brought it
    out["hf_kernels"] = getattr(kernels, "__file__", None)
    out["hf_kernels_has_hub_api"] = hasattr(kernels, "get_kernel")
except ImportError:
    out["hf_kernels"] = None
import torch
import vb
p = vb.build_tiny_videobooth("unet").pipeline()
p.set_progress_bar_config(disable=True)
with tempfile.TemporaryDirectory() as d:
    p.save_pretrained(d)
    q = vb.VideoBoothPipeline.from_pretrained(d)
sa, sb = p.backbone.state_dict(), q.backbone.state_dict()
out["round_trip"] = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
print("PROBE" + json.dumps(out))
"""


def _run_probe(cwd: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # the project as installed (pip install -e .), not through the tests' sys.path
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"from {cwd}:\n{r.stderr[-4000:]}"
    line = next(x for x in r.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


@pytest.mark.parametrize("where", ["repo root", "another folder"])
def test_imports_and_pipeline_round_trip_beside_hf_kernels(where, tmp_path):
    cwd = ROOT if where == "repo root" else tmp_path
    got = _run_probe(cwd)
    assert Path(got["vb_kernels"]).resolve() == ROOT / "vb_kernels" / "__init__.py", got
    if got["hf_kernels"] is not None:  # theirs is theirs, from either folder
        assert "site-packages" in Path(got["hf_kernels"]).resolve().parts, got
        assert got["hf_kernels_has_hub_api"], got
    assert got["round_trip"], got


def test_hf_kernels_is_present_where_transformers_needs_it():
    """The collision only shows with transformers' `kernels` installed: make sure this suite
    runs with it whenever the installed transformers declares it (so the test above can fail)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("transformers") or []
    except PackageNotFoundError:
        pytest.skip("transformers is not installed")
    needs = any(r.split(";")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip() == "kernels"
                and "extra ==" not in r for r in reqs)
    if not needs:
        pytest.skip("the installed transformers does not depend on PyPI's kernels")
    assert importlib.util.find_spec("kernels") is not None


def test_no_top_level_name_is_taken():
    """Every top-level package the project installs, and none of the taken names."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    include = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                   for kw in node.keywords if kw.arg == "include")
    names = {ast.literal_eval(e).split(".")[0] for e in include.elts}
    assert names == set(PACKAGES)
    assert not names & set(TAKEN), {n: TAKEN[n] for n in names & set(TAKEN)}
    for name in TAKEN:
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/ shadows {TAKEN[name]} from the repo root"


def test_no_file_imports_the_old_names():
    """No module, test, tool or doc imports `kernels` or `train` as this project's package."""
    bad = []
    for path in ROOT.rglob("*"):
        if path.suffix not in {".py", ".md", ".yaml", ".sh", ""} or not path.is_file():
            continue
        if any(part in {".venv", ".git", "__pycache__", "build", "dist", ".whl"} or part.endswith(".egg-info")
               for part in path.relative_to(ROOT).parts):
            continue
        if path.suffix == "" and path.name not in {"run"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if path == Path(__file__).resolve():
                continue
            for old in ("kernels", "train"):
                if (s.startswith((f"from {old} import", f"from {old}.", f"import {old}.")) or s == f"import {old}"
                        or f"-m {old} " in s or f"-m {old}." in s or s.endswith(f"-m {old}")
                        or f'"-m", "{old}' in s):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {s}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old", ["train.videobooth_task:VideoBoothTask", "kernels.api:videobooth_attention"])
def test_a_config_with_an_old_package_name_says_the_new_one(old):
    """A run config written before the rename names `train.` / `kernels.`: the error says where
    the package went (whether or not PyPI's package of that name is installed)."""
    from vb_train.config import TrainConfig
    from vb_train.registry import build_task

    with pytest.raises(ValueError, match=r"task: cannot import .*the package is now 'vb_(train|kernels)'"):
        build_task(TrainConfig(task=old))
