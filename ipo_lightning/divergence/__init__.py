"""How far the policy has moved from the reference.

- :mod:`~ipo_lightning.divergence.token_kl`: the exact token-level KL, reverse KL and entropy math;
- :mod:`~ipo_lightning.divergence.sampling`: the sequence KL estimated from sampled completions;
- :mod:`~ipo_lightning.divergence.measure`: one measurement, policy + reference + data -> metrics.
"""
