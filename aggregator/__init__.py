"""The coordinator side: Flower ServerApp, dimension-aware strategy, provisioning, run control.

Imports the science from ``fed_unimiss``; never imports ``site_client``.
"""
