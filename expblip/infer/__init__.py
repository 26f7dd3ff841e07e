"""The inference core that evaluation, serving and pseudo-captioning stand on: ``captioner`` (an export loaded as a
batched captioner, image loading), ``face`` (offline face crops) and ``parse`` (AUs and emotions read back out of a
caption). It imports no Ray, DeepSpeed or MLflow, and neither ``expblip.eval`` nor ``expblip.serve``: both import
it. Nothing is imported here, so that ``expblip.infer.parse`` stays free of torch."""
