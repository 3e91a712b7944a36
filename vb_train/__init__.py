"""VideoBooth training (docs/train.md), laid out as:

- training core: ``config`` (keys, CLI), ``tasks`` (``TrainTask``, ``DiffusionTask``),
  ``registry`` (tasks by name), ``videobooth_task`` (the VideoBooth task), ``trainer`` (the loop on
  accelerate / diffusers), ``checkpoint`` (atomic checkpoints);
- data: ``data`` (the VideoBooth layout, decoding, prompt augmentation), ``synthetic``;
- evaluation: ``metrics``, ``evaluation`` (a run as a pipeline, generation, tables, GIFs);
- the toy-scale experiment the demo and the ablations share: ``experiment``;
- thin CLIs: ``__main__`` (``python -m vb_train``), ``demo``, ``ablations``, ``throughput``.

Submodules are imported on demand so that ``import vb_train`` stays light (no open_clip / timm /
PyAV until they are needed)."""
