"""osdsim: a discrete-event simulator and real-hardware validator for Online Speculative Decoding."""

__version__ = "0.1.0"


def simulate(scenario, progress=None):
    """Simulate a scenario (path or Scenario); see osdsim.api.simulate."""
    from osdsim.api import simulate as _simulate

    return _simulate(scenario, progress=progress)


def compare(scenario, strategies=None, progress=None):
    """Simulate several strategies on the same arrivals; see osdsim.api.compare."""
    from osdsim.api import compare as _compare

    return _compare(scenario, strategies=strategies, progress=progress)


__all__ = ["__version__", "compare", "simulate"]
