"""`fedscan pretrain`: self-supervised (SimCLR-style) pretraining of a backbone on unlabelled CT
slices; the output is a fedscan weights file that ``export.zoo.create_model(arch,
pretrained=...)`` (and so a node's ``[training] pretrained``) starts from."""
