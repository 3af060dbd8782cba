"""`fedscan demo`: a whole federation on one machine (broker, coordinator, edge nodes as
separate processes), fed with CT slices over time, ending in the paper's table and a report."""
