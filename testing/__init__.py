"""What trainact's tests and benchmarks share, beside the package's own float64 references
(:mod:`trainact.testing`): the harness (:mod:`testing.harness`), the accuracy cases on real
photos (:mod:`testing.accuracy_cases`), the integrations' tiny task (:mod:`testing.tiny_task`)
and pytest marks (:mod:`testing.markers`). It lives at the repository's root and is not
installed with the package; pytest puts the root on ``sys.path`` (``pythonpath`` in
pyproject.toml), the benchmarks insert it themselves.
"""
