"""Differential privacy (docs/privacy.md): the `dp` config section
(`settings.py`), the accountant (`accountant.py`), client-level DP-FedAvg
(`client_dp.py`) and DP-SGD inside each client (`dp_sgd.py`)."""
