"""Reporting: tables, figures, the claims' verdicts and the run's README; viewers for JupyterLab.
"""
