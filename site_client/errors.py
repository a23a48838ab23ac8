"""Error codes of a site's reply. The text sent with them is fixed, so nothing site-specific
leaves the site; the aggregator records the code and its own reason (aggregator/strategy.py)."""

ERROR_TRAIN, ERROR_EVALUATE = 5001, 5002
ERROR_EXCHANGE = 5003  # the site cannot honour the announced exchange codec
ERROR_WORKER = 5004  # the site's worker stopped during the round (it is being restarted)
