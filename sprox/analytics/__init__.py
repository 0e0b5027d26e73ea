"""Analytics: what Sprox records about the requests it serves.

`sprox.analytics.accesslog` writes one record per S3 request to Parquet files (schema
in its docstring) for SQL reports. This package imports nothing heavy by itself:
pyarrow is loaded only with the access log.
"""
