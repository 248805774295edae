"""How far the policy has moved from the reference: exact token-level KL and sampled sequence KL."""
