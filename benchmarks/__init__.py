"""Benchmarks of peft_ctx methods against text RAG: ``python -m benchmarks.run`` (``make bench``),
``python -m benchmarks.decoding`` (which decoding set-up every method uses) and ``python -m benchmarks.check``
(regression check by speed-up ratios, ``make bench-check``). The methods compared are registered in
``benchmarks.methods.registry()`` (the peft_ctx rows: each method's benchmark rows, ``peft_ctx.harness.rows``)."""
