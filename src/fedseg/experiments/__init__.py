"""Experiments built on the chain: SegViz's node sets and the CT/MRI-like contrast study.
"""
