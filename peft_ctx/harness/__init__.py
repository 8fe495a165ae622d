"""The experiment harness: offline assets, QA datasets, metrics, the evaluation harness, the demo and fast decoding
for the benchmarks. It uses the library (``peft_ctx``) like any user would; the library never imports it."""
