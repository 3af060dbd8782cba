"""From a file in the inbox to a model-ready array: watch, decode DICOM, HU and display
windows, preprocess, texture features, quarantine what cannot be read. No torch."""
