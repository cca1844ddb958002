"""The runtime: process groups, sequence-parallel runners, engines, sampler and streaming sessions.

The runtime never imports the exporter; it reads engine directories through ropesp/manifest.py.
"""
