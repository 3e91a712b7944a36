"""VideoBooth training (docs/train.md), laid out as a diffusers training example on accelerate:

- the core: ``__main__`` (``python -m vb_train`` / ``accelerate launch -m vb_train``), ``config``
  (keys, CLI), ``tasks`` (``TrainTask``, ``DiffusionTask``), ``registry`` (tasks by name),
  ``videobooth_task`` (the VideoBooth task), ``trainer`` (the loop on accelerate / diffusers),
  ``checkpoint`` (atomic checkpoints), ``data`` (the VideoBooth layout, decoding, prompt
  augmentation), ``metrics`` (identity metrics, CLIP / DINO encoders), ``throughput`` (data
  loading speed);
- ``toy``: the toy-scale experiments on that core (synthetic data, the CPU demo, the ablations
  and their IP-Adapter baseline, the probes); the core never imports it.

Submodules are imported on demand so that ``import vb_train`` stays light (no open_clip / timm /
PyAV until they are needed)."""
