"""Evaluation: metrics, the test-split scoring of 02-03 and the external BTCV evaluation of 04.
"""
