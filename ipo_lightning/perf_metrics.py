"""The metric names :class:`~ipo_lightning.callbacks.performance.StepPerformance` logs.

Their own module, free of Lightning and torch, so the reports read them without importing either.
"""

PREFIX = "perf/"
STEP_TIME = PREFIX + "step_time"
PEAK_MEMORY = PREFIX + "peak_memory_gb"
