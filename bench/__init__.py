"""The benchmark harness (installed as ``attn_zoo.bench``): ``bench run``, ``list``,
``report`` and ``compare``."""
