"""export: the model zoo and the way from torch to the ONNX file the edge node runs.

    zoo           create_model(arch, texture_dim=, pretrained=), list_archs(), FedscanNet
    net           FedscanNet (grayscale normalisation, backbone, classifier), train modes
    cnn2d         the paper's small CNN
    pretrained    hub / local-file / no pretrained weights for timm backbones
    weights       safetensors save/load (+ numpy state for the wire), never pickle
    onnx_export   one self-contained ONNX file with fedscan metadata
    parity        torch vs onnxruntime logits
    quantize      optional INT8 copies (measure only)
    errors        ExportError tree

Everything here imports torch; the inference path (edge_node) reads the ONNX file without it.
"""
