"""The hospital side: Flower ClientApp, ``fed-unimiss site`` commands, the DP budget ledger.

Imports the science from ``fed_unimiss``; never imports ``aggregator``.
"""
