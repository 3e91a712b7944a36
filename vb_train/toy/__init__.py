"""The toy-scale experiments built on the training core (docs/demo.md): the synthetic
subject-video set (``synthetic``), the experiment the CPU demo and the ablations share
(``experiment``, ``evaluation``), the demo, the ablations and their IP-Adapter baseline task
(``ip_adapter``), and the linear probes (``probe``). Nothing in ``vb_train``'s core imports
them; each CLI is ``python -m vb_train.toy.<name>``."""
