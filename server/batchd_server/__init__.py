"""batchd_server: pack datasets into flat files and serve them as training batches."""

__all__: list[str] = []
