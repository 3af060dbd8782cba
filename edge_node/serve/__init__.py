"""Predict and serve: the pipeline from a decoded file to a stored prediction, its crash
guard, the ONNX runtime, Prometheus stats and the local HTTP API and page. No torch."""
