"""DICOM result objects for one complete series, made with highdicom, for the outbox.

    sr.py   TID 1500 Measurement Report (Comprehensive 3D SR): verdict, score, threshold,
            uncertain band, rule, model version and calibration state, image library of the
            source instances
    sc.py   Secondary Capture summary image: key slices with their P(covid) as text

Both go into the source study (same StudyInstanceUID, a new series each) and carry only the
patient and study modules of the source, nothing else of it.
"""
