"""The ``fed-unimiss`` console command."""
