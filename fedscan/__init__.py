"""fedscan: the command line and the glue that may import every package (demo, bench, tools).

`edge_node`, `coordinator`, `export` and `fl_protocol` are the runtime packages; this package
only wires them together for humans (CLI, benchmarks, demo, provisioning, dataset import).
"""
