"""Learned KV scheduling: the policy families and their engine hooks (policy), the relaxed,
differentiable decode step (relaxed), and training and judging policies (train).

Import the modules themselves (``from pamjax.learn import train``).
"""
