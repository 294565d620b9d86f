"""Learned KV scheduling: the policy families and their engine hooks (policy), the relaxed,
differentiable decode step (relaxed), training, episodes and the grid-search baseline
(train), and the exact engine as the judge of every reported number (judge).

Import the modules themselves (``from pamjax.learn import train``).
"""
