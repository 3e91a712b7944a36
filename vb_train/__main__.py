"""``python -m vb_train --config configs/X.yaml [options] [key=value ...]``, also
``accelerate launch [--num_processes N] [--cpu] -m vb_train ...`` and ``torchrun --nproc_per_node N -m vb_train ...``.
See docs/train.md."""
from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from .config import config_from_args

    cfg, args = config_from_args(argv)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from .trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.train()
    if trainer.main:
        print(f"{summary['status']}: step {summary['step']}, checkpoint {summary['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
