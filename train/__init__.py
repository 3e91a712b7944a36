"""VideoBooth training: data (`train.data`, `train.synthetic`) and evaluation metrics
(`train.metrics`). Submodules are imported on demand so that `import train` stays light
(no open_clip / timm / PyAV until they are needed)."""
