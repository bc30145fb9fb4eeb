"""The CI gate: ``compare`` (a run against a baseline, noise-aware), ``outputs`` (terminal
cells, markdown summary, JUnit), ``merge`` (shards of one sweep into one run folder) and
``cli`` (the ``regress`` and ``merge`` commands). Pure code: it reads results, never a GPU."""
