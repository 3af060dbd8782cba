"""DICOM networking of the edge node: a C-STORE SCP that drops received instances into the
inbox (``listener``), a persistent outbox of result objects (``outbox``) and the C-STORE SCU
that delivers them to the PACS with retries (``sender``). No torch anywhere in here."""
