"""Brokers fedscan can start itself for benchmarks, demos and tests (the embedded one lives in
``fl_protocol``): a real Mosquitto process on a free loopback port."""
