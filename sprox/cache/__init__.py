"""The block cache: object records, block files, fills, eviction, persistence.

`ObjectCache` (service.py) is the one entry point the front end uses."""
