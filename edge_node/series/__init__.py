"""Series: grouping slices into series, the chest-only filter, completion and the verdict.

chest.py    is a slice chest CT? header rules, then a lung-air content probe
verdict.py  series verdict rules (registry by name) from the slice probabilities
tracker.py  completes series after a quiet time or at the expected count, then
            stores the verdict and hands the results (edge_node.results) to the outbox
"""
