"""One process of tests/test_train_fsdp.py, started by ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` (2 CPU processes, gloo): the trainer's stage-2 step on the tiny
VideoBooth task, sharded with FSDP2 by accelerate's own ``fsdp2_prepare_model`` (through
:class:`vb_train.trainer.FSDPProcess`), against the same step unsharded; then a sharded
save (accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer``: a distributed checkpoint) and
a resume into a fresh model. Raises (non-zero exit) on any mismatch; rank 0 writes a summary.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_stage2_step.py OUT DATA
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: str, data: str) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.tensor import DTensor

    from vb_train.config import TrainConfig
    from vb_train.registry import build_task
    from vb_train.trainer import FSDPProcess, build_optimizer, derive_seed, seed_all, sharded_parameters

    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's process state: the gloo group (its FSDP helpers log through it)
    rank, world = dist.get_rank(), dist.get_world_size()
    plugin = FullyShardedDataParallelPlugin()  # what accelerate launch read from the shipped config
    proc = FSDPProcess(plugin, "cpu")
    cfg = TrainConfig.from_dict(dict(
        task="videobooth", stage=2, device="cpu", seed=0, batch_size=2, lr=1e-3, max_grad_norm=1.0,
        cond_dropout=0.5, ema_decay=0.0, progress=False,
        data={"root": data, "num_frames": 4, "size": 16, "image_size": 32}))

    def build():
        """The trainer's model setup: seeded task, stage-2 split of frozen and trained weights."""
        seed_all(cfg.seed)
        task = build_task(cfg)
        names = [n for n, _ in task.named_trainable_parameters(cfg.stage)]
        task.requires_grad_(False)
        for n, p in task.named_parameters():
            p.requires_grad_(n in names)
        task.set_train_mode(cfg.stage)
        return task, names

    def optimizer(task, names):  # (after fully_shard: the sharded parameters, as the trainer collects them)
        ps = [p for _, p in sharded_parameters(task, names)]
        return ps, build_optimizer(cfg, ps)

    def batch(step, r):  # global batch of step s: items 4s..4s+3; process r reads its half
        i = step * world * cfg.batch_size + r * cfg.batch_size
        return ref_task.collate([dataset[j] for j in range(i, i + cfg.batch_size)])

    def gen(step, r):  # the trainer's per-(seed, rank, micro-batch) generator
        return torch.Generator().manual_seed(derive_seed(cfg.seed, 0x57E9, r, step))

    def step_(task, params, opt, losses):
        loss = torch.stack(losses).mean()
        assert loss.requires_grad
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    # -- the unsharded step: every process's half, averaged (what data parallelism computes) ------
    ref_task, names = build()
    dataset = ref_task.build_dataset()
    ref_params, ref_opt = optimizer(ref_task, names)
    ref = [step_(ref_task, ref_params, ref_opt, [ref_task(batch(s, r), gen(s, r))["loss"] for r in range(world)])
           for s in range(2)]

    # -- the sharded step ---------------------------------------------------------------------------
    def sharded():
        task, names = build()
        frozen = {n: p.detach().clone() for n, p in task.named_parameters() if n not in names}
        before = {id(p) for n, p in task.named_parameters() if n in names}
        task = proc.prepare_model(task)
        params, opt = optimizer(task, names)
        # fully_shard replaced the parameter objects: a list collected before would clip nothing
        assert not any(id(p) in before for p in params)
        return task, params, opt, frozen

    task, params, opt, frozen = sharded()
    full = dict(task.named_parameters())
    assert all(isinstance(p, DTensor) for p in full.values()), "a parameter was left unsharded"
    local = sum(p.to_local().numel() for p in full.values())
    total = sum(p.numel() for p in full.values())
    assert local < 0.6 * total, (local, total)  # each process holds about half
    assert {n for n, p in full.items() if p.requires_grad} == set(names)

    def sharded_step(task, params, opt, s):
        loss, norm = step_(task, params, opt, [task(batch(s, rank), gen(s, rank))["loss"]])
        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)  # the mean over processes (FSDP averages the gradients the same way)
        return float(t) / world, norm

    got1 = sharded_step(task, params, opt, 0)
    ckpt = Path(out) / "ckpt"
    save_fsdp_model(plugin, proc, task, str(ckpt))  # sharded: one distributed checkpoint, every process writes
    save_fsdp_optimizer(plugin, proc, opt, task, str(ckpt))
    got2 = sharded_step(task, params, opt, 1)

    def weights(task):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in task.named_parameters()}

    after = weights(task)
    ref_w = dict(ref_task.named_parameters())
    for (lg, ng), (lr, nr) in zip((got1, got2), ref):
        assert abs(lg - lr) <= 1e-5 * abs(lr) + 1e-7, (lg, lr)
        assert abs(ng - nr) <= 1e-4 * abs(nr) + 1e-6, (ng, nr)
    for n in names:
        torch.testing.assert_close(after[n], ref_w[n].detach(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for n, w in frozen.items():
        assert torch.equal(after[n], w), f"{n}: a frozen weight changed"

    # -- resume: a fresh sharded model loads the step-1 checkpoint and runs step 2 ------------------
    task_b, params_b, opt_b, _ = sharded()
    load_fsdp_model(plugin, proc, task_b, str(ckpt))
    load_fsdp_optimizer(plugin, proc, opt_b, task_b, str(ckpt))
    got2b = sharded_step(task_b, params_b, opt_b, 1)
    after_b = weights(task_b)
    assert got2b[0] == got2[0], (got2b, got2)
    for n in after:
        assert torch.equal(after_b[n], after[n]), f"{n}: the resumed run differs"
    if rank == 0:
        (Path(out) / "summary.json").write_text(json.dumps({
            "world": world, "ref": ref, "sharded": [got1, got2], "resumed": got2b, "trainable": len(names),
            "local_fraction": local / total, "checkpoint": sorted(p.name for p in ckpt.rglob("*") if p.is_file())}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
