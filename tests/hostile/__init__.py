"""Hostile inputs, each built here, so that the failures found by trying the tool as a
hostile user would stay fixed: numbered as in the issue "Reliability".

1. outputs of one input never silently replace another input's (``--on-clash``);
2. two runs into one output folder: the second refuses, naming the first;
3. a full disk or a permission error stops the run once, with a summary, and never
   leaves a label image without its provenance record; a rerun finishes;
4. an unusable output folder fails before the model loads, without a traceback;
5. no silent waits or drops: no dask worker, inputs inside the output folder,
   dangling symbolic links;
6. checkpoint errors never advise ``weights_only=False`` (the weights cache checks
   are in tests/test_weights.py);
7. API edges: empty prompt batches, extreme aspect ratios;
8. provenance over resumed runs, Ctrl-C at any moment, no empty work folders.

The batch tool runs in-process on the tiny model (``tool``), or as real processes
that build the same tiny model (``drivers``, and ``tiny_env`` for LocalCluster workers).
"""
