"""The rtmdet-serve front end: HTTP and gRPC over one dynamic batcher."""
