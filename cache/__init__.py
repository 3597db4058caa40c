"""The site cache: block store, upstream selection, fetching, and the cache server."""
