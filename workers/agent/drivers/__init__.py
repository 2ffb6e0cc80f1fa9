"""Runtime drivers behind one `Driver` protocol: `process` (local subprocesses) and `fake`
(a simulated node that runs nothing, for scale tests)."""
