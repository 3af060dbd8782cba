"""Local training: the job description, the subprocesses that run it, the trainer, its
loop, data, checkpoints, augmentation and the patient-disjoint split. Imports torch (in the
worker processes only)."""
