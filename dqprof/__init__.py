"""dqprof: kernel-level dequantization profiler."""

__version__ = "0.1.0"
